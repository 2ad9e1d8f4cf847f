"""Who may use a Ray cluster. Our clusters run Ray's token authentication (``RAY_AUTH_MODE=token`` on every node,
one shared token; Ray >= 2.52): our clients send the token from where Ray looks for it and say in one line what is
missing when they cannot. The private Ray a pipeline starts for itself listens on 127.0.0.1 only and takes
requests only with a token made for it. See docs/cluster.md."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc
import ray
from ray._private import ray_constants
from ray._raylet import AuthenticationTokenLoader, Config
from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc
from ray.exceptions import AuthenticationError

from denseclip.runlog import environment

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

TOKEN_HELP = ("set RAY_AUTH_TOKEN to the cluster's token or write it to ~/.ray/auth_token "
              "(`ray get-auth-token` on the head node prints it; see docs/cluster.md)")
REACH_HELP = ("is it running, and the tunnel to it open (`ray dashboard infra/cluster.yaml`, or "
              "`kubectl port-forward`; see docs/cluster.md)?")
# A Ray (GCS) address as ray.init takes it: host:port. Other forms ("auto", ray://) are not probed.
_RAY_ADDRESS = re.compile(r"^[\w.\-]+:\d+$|^\[[0-9a-fA-F:]+\]:\d+$")
_PROBE_TIMEOUT_S = 15.0


class ClusterAccessError(ConnectionError):
    """This process cannot use the Ray cluster at an address: nothing answers there, or the cluster requires a
    token and none was found, or it refused the one found. The message is one line that names the fix."""


def cluster_token() -> str | None:
    """The token Ray itself sends: ``$RAY_AUTH_TOKEN``, else the file ``$RAY_AUTH_TOKEN_PATH`` names, else
    ``~/.ray/auth_token`` (whitespace stripped); None when there is none."""
    loader = AuthenticationTokenLoader.instance()
    loader.reset_cache()  # it keeps a token once found; the environment may have changed since
    try:
        return loader.get_raw_token(ignore_auth_mode=True) if loader.has_token(ignore_auth_mode=True) else None
    except AuthenticationError:  # Ray's only refusal here: $RAY_AUTH_TOKEN_PATH unreadable or empty
        raise ClusterAccessError(f"RAY_AUTH_TOKEN_PATH={os.environ.get('RAY_AUTH_TOKEN_PATH')}: cannot be read or "
                                 f"is empty; {TOKEN_HELP}") from None


def _token_source() -> str:
    """Where :func:`cluster_token` found the token, in Ray's order."""
    if os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return "$RAY_AUTH_TOKEN"
    return os.environ.get("RAY_AUTH_TOKEN_PATH") or "~/.ray/auth_token"


def _is_dashboard(address: str) -> bool:
    return address.startswith(("http://", "https://"))


def _dashboard_status(url: str, path: str, token: str | None = None) -> tuple[int, bytes]:
    """(HTTP status, body) of ``GET url + path``, with the token as a bearer token when given."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url.rstrip("/") + path, headers=headers),
                                    timeout=_PROBE_TIMEOUT_S) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError as exc:  # URLError among them: no connection, no answer in time
        reason = getattr(exc, "reason", exc)
        raise ClusterAccessError(f"cannot reach the Ray cluster at {url} ({reason}): {REACH_HELP}") from None


def _gcs_accepts(address: str, token: str | None) -> bool:
    """Whether the GCS at ``address`` answers a call that carries ``token`` (None: no token) rather than refusing
    it as unauthenticated. A plain gRPC channel: Ray's own channels add the token only in token mode."""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    with grpc.insecure_channel(address) as channel:
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), metadata=metadata, timeout=_PROBE_TIMEOUT_S,
                wait_for_ready=True)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
                return False
            raise ClusterAccessError(f"cannot reach the Ray cluster at {address} ({exc.code().name.lower()}): "
                                     f"{REACH_HELP}") from None
    return True


def requires_token(address: str) -> bool:
    """Whether the cluster at ``address`` enforces token authentication, asked without a token: a dashboard URL
    (``http://127.0.0.1:8265``) on its public ``/api/authentication_mode``, a Ray address (``host:port`` of the
    GCS) by refusing an unauthenticated call. ClusterAccessError when nothing answers there."""
    if _is_dashboard(address):
        status, body = _dashboard_status(address, "/api/authentication_mode")
        return status == 200 and json.loads(body).get("authentication_mode") == "token"
    return not _gcs_accepts(address, None)


def check_token(address: str) -> str | None:
    """The token to send to the cluster at ``address`` (a dashboard URL or a Ray address; None: it takes requests
    without one). ClusterAccessError when it cannot be reached, or requires a token and none is found, or refuses
    the one found."""
    if not requires_token(address):
        return None
    token = cluster_token()
    if token is None:
        raise ClusterAccessError(f"the Ray cluster at {address} requires a token and none was found: {TOKEN_HELP}")
    accepted = (_dashboard_status(address, "/api/version", token)[0] == 200 if _is_dashboard(address)
                else _gcs_accepts(address, token))
    if not accepted:
        raise ClusterAccessError(f"the Ray cluster at {address} refused the token from {_token_source()}: "
                                 f"{TOKEN_HELP}")
    return token


def check_access(address: str | None) -> None:
    """Before a pipeline starts its work: ClusterAccessError (one line naming the fix) when the cluster at
    ``address`` (else ``$RAY_ADDRESS``) cannot be reached or wants a token this process lacks. Nothing to check
    for a private local Ray (neither given), nor for addresses Ray resolves itself (``auto``, ``ray://``)."""
    address = address or os.environ.get("RAY_ADDRESS")
    if address and (_is_dashboard(address) or _RAY_ADDRESS.match(address)):
        check_token(address)


def _reload_auth_config() -> None:
    """Ray reads ``RAY_AUTH_MODE`` into its configuration once, at import, and keeps a token once found: read
    both again from the environment now (as Ray's own tests switch modes). Only while no Ray is connected."""
    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


@contextlib.contextmanager
def _token_mode(on: bool) -> Iterator[None]:
    """Ray's token authentication on (or off) for this process within the block, to match the cluster it
    joins: a driver in token mode refuses calls from a cluster without it, and the other way round. No change
    while a driver is connected (its mode is fixed until it disconnects)."""
    if ray.is_initialized():
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.callback(_reload_auth_config)  # runs last: after the environment is restored
        stack.enter_context(environment("RAY_AUTH_MODE", "token" if on else "disabled"))
        _reload_auth_config()
        yield


@contextlib.contextmanager
def connected(address: str) -> Iterator[None]:
    """This process as a driver on the Ray cluster at ``address`` (a Ray address, as ``ray.init`` takes it), in
    Ray's token mode when the cluster requires a token (ClusterAccessError when that token is missing or
    refused); disconnected after."""
    with contextlib.ExitStack() as stack:
        if _RAY_ADDRESS.match(address):
            stack.enter_context(_token_mode(check_token(address) is not None))
        ray.init(address=address, logging_level=logging.WARNING)
        stack.callback(ray.shutdown)
        yield


@contextlib.contextmanager
def _loopback() -> Iterator[None]:
    """Ray started within the block gets the node address 127.0.0.1, so that each of its servers binds 127.0.0.1
    only (they bind every interface otherwise). Ray 2.58 replaces 127.0.0.1 by the machine's routable address
    unless its single-machine mode is on, which it reads at import (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``):
    that flag is set here."""
    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before


@contextlib.contextmanager
def local_ray(**options) -> Iterator[None]:
    """A private Ray on this machine within the block (``ray.init(address="local", **options)``, no dashboard,
    quiet): every server on 127.0.0.1 only, token authentication with a token made for it; shut down after."""
    with contextlib.ExitStack() as stack:
        # The Ray processes started here inherit the token from this environment: nothing is written to ~/.ray.
        stack.enter_context(environment("RAY_AUTH_TOKEN", secrets.token_hex(32)))
        stack.enter_context(_token_mode(True))
        with _loopback():
            # "local" always starts a new instance, never joins a cluster someone else started on this machine.
            ray.init(address="local", include_dashboard=False, logging_level=logging.WARNING, **options)
        stack.callback(ray.shutdown)
        yield


def job_client(address: str) -> JobSubmissionClient:
    """A job submission client for the cluster at ``address``: its dashboard URL (``http://127.0.0.1:8265``, the
    local end of the tunnel or port-forward) or a Ray address (``host:port``; the cluster names its dashboard),
    sending the cluster's token when it requires one. ClusterAccessError (one line) when it cannot."""
    # Imported here: the job client brings the dashboard's HTTP stack, which drivers never need.
    from ray.dashboard.utils import ray_address_to_api_server_url
    from ray.job_submission import JobSubmissionClient

    token = check_token(address)
    with _token_mode(token is not None):
        if not _is_dashboard(address):
            address = ray_address_to_api_server_url(address)
        # Given the token as a header, the client needs no RAY_AUTH_MODE in the caller's environment.
        return JobSubmissionClient(address, headers={"Authorization": f"Bearer {token}"} if token else None)
