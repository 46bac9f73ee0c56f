"""Sources read raw inputs (refer-toolkit annotations, caption folders or tables) into a `SourcePlan`."""
