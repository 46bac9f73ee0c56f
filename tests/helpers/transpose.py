"""numpy equivalents of Pillow's Image.Transpose operations 0..6: the oracle for EXIF-rotated masks."""

import numpy as np

NUMPY_TRANSPOSE = {
    0: lambda m: m[:, ::-1],  # FLIP_LEFT_RIGHT
    1: lambda m: m[::-1, :],  # FLIP_TOP_BOTTOM
    2: lambda m: np.rot90(m, 1),  # ROTATE_90
    3: lambda m: np.rot90(m, 2),  # ROTATE_180
    4: lambda m: np.rot90(m, -1),  # ROTATE_270
    5: lambda m: m.T,  # TRANSPOSE
    6: lambda m: np.rot90(m, 2).T,  # TRANSVERSE
}
