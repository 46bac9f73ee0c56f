"""Before joining a Ray cluster by address: ask its head whether it answers and accepts this client.

Why: Ray 2.60 (the version the project installs) turns token authentication on for `ray start --head` whenever a
token exists on the head (~/.ray/auth_token, which any earlier local Ray run creates). A client that
joins by an explicit address sends its token only when its own environment says
`RAY_AUTH_MODE=token`; without it `ray.init` retries for about 20 seconds, printing an
`InvalidAuthToken` warning each second, and then fails with "Failed to connect to Ray cluster".
The same happens, with other warnings, when nothing listens at the address.

`check_cluster(address)` makes one call to the head's GCS (the cluster-id request `ray.init` starts
with), with the token Ray itself would send, and turns the answer into one sentence saying what to
set. It speaks only to plain `host:port` addresses: "auto" finds a local head (Ray then picks up the
local token by itself) and `ray://` goes through Ray Client, which reports its own errors.
"""

from __future__ import annotations

import os
import re

from sgdata.format.errors import UserError

_HOST_PORT = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+):\d+$")
PROBE_SECONDS = 10.0
TOKEN_SOURCES = ("the RAY_AUTH_TOKEN variable, the file RAY_AUTH_TOKEN_PATH names, or ~/.ray/auth_token; "
                 "`ray get-auth-token` on the head prints the cluster's token")


def _auth_mode() -> str:
    return os.environ.get("RAY_AUTH_MODE", "").strip().lower()


def _has_token() -> bool:
    from ray._raylet import AuthenticationTokenLoader

    return AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True)


def _probe(address: str) -> tuple[str, str]:
    """(gRPC status name, details) of the head's answer to a cluster-id request sent as Ray would."""
    import grpc
    from ray._private.authentication.grpc_authentication_client_interceptor import (
        _get_authentication_metadata_tuple,
    )
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel)
        try:
            stub.GetClusterId(gcs_service_pb2.GetClusterIdRequest(), timeout=PROBE_SECONDS,
                              metadata=_get_authentication_metadata_tuple())
        except grpc.RpcError as err:
            return err.code().name, err.details() or ""
    return "OK", ""


def check_cluster(address: str) -> None:
    """Raise a one-sentence UserError when the head at `address` will not take this client; else return."""
    if not _HOST_PORT.match(address):
        return
    if _auth_mode() == "token" and not _has_token():
        raise UserError(f"RAY_AUTH_MODE=token is set but no Ray token is on this machine: provide the token of "
                        f"the cluster at {address} through {TOKEN_SOURCES}.")
    try:
        status, details = _probe(address)
    except ImportError:  # a Ray without these modules: let ray.init speak for itself
        return
    if status == "UNAUTHENTICATED":
        if _auth_mode() != "token":
            raise UserError(f"the Ray cluster at {address} requires token authentication: set RAY_AUTH_MODE=token "
                            f"in this environment, with the token in {TOKEN_SOURCES}.")
        raise UserError(f"the Ray cluster at {address} refused this machine's token: use the head's token "
                        f"(through {TOKEN_SOURCES}).")
    if status in ("UNAVAILABLE", "DEADLINE_EXCEEDED"):
        raise UserError(f"no Ray cluster answers at {address} (is `ray start --head --port PORT` running there, "
                        f"and is the port reachable from this machine?).")
