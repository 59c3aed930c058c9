"""gRPC's own interop cases, run through meshlib's channels: the cases are the spec for a gRPC drop-in.

gRPC's source release is fetched at test time (never vendored): the installed grpcio's tag from GitHub, or, where
GitHub is out of reach (as in CI), the pristine upstream tarball Debian mirrors, checked against its SHA-256. From it
come ``src/proto/grpc/testing/*.proto`` (stubs generated with grpcio-tools), gRPC's interop servicer
(``tests/interop/service.py``) and its client cases, sync (``tests/interop/methods.py``) and aio
(``tests_aio/interop/methods.py``). Only their imports are adapted: the generated modules get a package name of
their own, and the Google-credential modules the four credential cases import become empty placeholders when
google-auth is not installed (those cases need Google's servers and are not run).

The servicer is served by ``meshlib.grpc.server``, in plaintext and under strict mTLS. Every case runs with grpc's
own channel first; every case that passes there must pass through meshlib's sync and aio channels, plaintext and
strict mTLS. ``MESHLIB_GRPC_SOURCE`` may name a gRPC source tarball or checkout to use offline."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.util
import io
import os
import sys
import tarfile
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

import grpc
import meshlib
import meshlib.grpc
from meshlib.discovery import StaticDiscovery
from meshlib.endpoints import Endpoint
from meshlib.security.ca import CertificateAuthority

#: Debian's copy of the upstream v1.51.1 release (``grpc_1.51.1.orig.tar.gz``), pinned by content.
DEBIAN_TARBALL = "http://deb.debian.org/debian/pool/main/g/grpc/grpc_1.51.1.orig.tar.gz"
DEBIAN_SHA256 = "b55696fb249669744de3e71acc54a9382bea0dce7cd5ba379b356b12b82d4229"

#: The files taken from the release, by their path under its top folder.
PROTOS = ("src/proto/grpc/testing/empty.proto", "src/proto/grpc/testing/messages.proto",
          "src/proto/grpc/testing/test.proto")  # fmt: skip
SYNC_CASES = "src/python/grpcio_tests/tests/interop/methods.py"
AIO_CASES = "src/python/grpcio_tests/tests_aio/interop/methods.py"
SERVICER = "src/python/grpcio_tests/tests/interop/service.py"

#: Cases that need Google's own servers and credentials: not runnable here, by anyone.
NEEDS_GOOGLE = {"compute_engine_creds", "oauth2_auth_token", "jwt_token_creds", "per_rpc_creds"}

GENERATED = "grpc_interop_protos"


def _download() -> bytes:
    version = grpc.__version__
    tried = []
    for url, digest in (
        (f"https://github.com/grpc/grpc/archive/refs/tags/v{version}.tar.gz", None),
        (DEBIAN_TARBALL, DEBIAN_SHA256),
    ):
        for _ in range(2):  # one more try for a flaky network
            try:
                answer = httpx.get(url, timeout=httpx.Timeout(20, connect=5), follow_redirects=True)
            except httpx.HTTPError as exc:
                tried.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            if answer.status_code != 200:
                tried.append(f"{url}: HTTP {answer.status_code}")
                break
            if digest and hashlib.sha256(answer.content).hexdigest() != digest:
                tried.append(f"{url}: SHA-256 is not {digest}")
                break
            return answer.content
    pytest.fail("could not fetch gRPC's source release; tried:\n" + "\n".join(tried) + "\nset MESHLIB_GRPC_SOURCE")


def _sources() -> dict[str, str]:
    """The wanted files' text, by their path in the release."""
    wanted = (*PROTOS, SYNC_CASES, AIO_CASES, SERVICER)
    given = os.environ.get("MESHLIB_GRPC_SOURCE")
    if given and Path(given).is_dir():
        return {name: (Path(given) / name).read_text() for name in wanted}
    data = Path(given).read_bytes() if given else _download()
    found: dict[str, str] = {}
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for member in tar:
            _, _, inner = member.name.partition("/")  # the top folder is grpc-<version>
            if inner in wanted and member.isfile():
                handle = tar.extractfile(member)
                assert handle is not None
                found[inner] = handle.read().decode()
    missing = sorted(set(wanted) - set(found))
    assert not missing, f"gRPC's release has no {missing}"
    return found


def _adapt(source: str) -> str:
    """The one change made to gRPC's files: the generated modules' package name."""
    return source.replace("from src.proto.grpc.testing import", f"from {GENERATED} import")


def _load(name: str, source: str, origin: str) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__file__ = origin
    sys.modules[name] = module
    exec(compile(_adapt(source), origin, "exec"), module.__dict__)
    return module


class Interop:
    """gRPC's interop files, loaded: ``test_pb2_grpc``, the servicer class and the sync and aio cases."""

    def __init__(self, root: Path) -> None:
        from grpc_tools import protoc

        sources = _sources()
        for name in PROTOS:
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            (root / name).write_text(sources[name])
        out = root / "out"
        out.mkdir()
        includes = Path(protoc.__file__).parent / "_proto"
        code = protoc.main(
            ["protoc", f"-I{root}", f"-I{includes}", f"--python_out={out}", f"--grpc_python_out={out}"]
            + [str(root / name) for name in PROTOS]
        )
        assert code == 0, f"protoc failed ({code}) on gRPC's interop protos"
        package = root / "gen" / GENERATED
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        for made in (out / "src/proto/grpc/testing").glob("*.py"):
            (package / made.name).write_text(_adapt(made.read_text()))
        sys.path.insert(0, str(root / "gen"))
        placeholders = self._google_auth_placeholders()
        try:
            self.sync_cases = _load("grpc_interop_sync_cases", sources[SYNC_CASES], SYNC_CASES)
            self.aio_cases = _load("grpc_interop_aio_cases", sources[AIO_CASES], AIO_CASES)
            self.servicer = _load("grpc_interop_service", sources[SERVICER], SERVICER).TestService
        finally:
            for name in placeholders:
                sys.modules.pop(name, None)
        self.test_pb2_grpc: Any = importlib.import_module(f"{GENERATED}.test_pb2_grpc")

    @staticmethod
    def _google_auth_placeholders() -> list[str]:
        if importlib.util.find_spec("google.auth") is not None:
            return []
        names = ["google.auth", "google.auth.environment_vars", "google.auth.transport",
                 "google.auth.transport.grpc", "google.auth.transport.requests"]  # fmt: skip
        for name in names:
            sys.modules[name] = types.ModuleType(name)
        return names

    def cases(self) -> list[str]:
        return [case.value for case in self.sync_cases.TestCase if case.value not in NEEDS_GOOGLE]


@pytest.fixture(scope="module")
def interop(tmp_path_factory: pytest.TempPathFactory) -> Interop:
    return Interop(tmp_path_factory.mktemp("grpc-interop"))


def _identity(ca: CertificateAuthority, out: Path, service: str) -> dict[str, str]:
    key = ec.generate_private_key(ec.SECP256R1())
    issued = ca.issue(key.public_key(), service)
    out.mkdir(parents=True, exist_ok=True)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (out / "key.pem").write_bytes(pem)
    (out / "cert.pem").write_bytes(issued.pem() + issued.chain_pem())
    (out / "ca.pem").write_bytes(ca.roots_pem())
    return {
        "MESH_TLS_CERT": str(out / "cert.pem"),
        "MESH_TLS_KEY": str(out / "key.pem"),
        "MESH_TLS_CA": str(out / "ca.pem"),
    }


def _mesh(service: str, tls: str, files: dict[str, str], state: Path, services: dict[str, list[Endpoint]]) -> Any:
    with pytest.MonkeyPatch.context() as env:
        for key, value in files.items():
            env.setenv(key, value)
        return meshlib.Mesh(
            service=service,
            discovery=StaticDiscovery(services),
            control_plane="",
            tls=tls,
            telemetry=False,
            state_dir=str(state),
        )


class Served:
    """gRPC's interop servicer on ``meshlib.grpc.server`` as the mesh service ``interop``, and a caller's mesh."""

    def __init__(self, interop: Interop, tls: str, root: Path) -> None:
        ca = CertificateAuthority.init(root / "ca") if tls == "strict" else None
        server_files = _identity(ca, root / "interop", "interop") if ca else {}
        caller_files = _identity(ca, root / "front", "front") if ca else {}
        self.server_mesh = _mesh("interop", tls, server_files, root / "server-state", {})
        self.server = meshlib.grpc.server(mesh=self.server_mesh, port=0, drain_delay=0)
        interop.test_pb2_grpc.add_TestServiceServicer_to_server(interop.servicer(), self.server)
        self.server.start()
        self.endpoint = Endpoint("127.0.0.1", self.server.port)
        self.caller = _mesh("front", tls, caller_files, root / "caller-state", {"interop": [self.endpoint]})
        self.tls = tls

    def close(self) -> None:
        self.caller.close()
        self.server.stop(0).wait(10)
        self.server_mesh.close()


@pytest.fixture(scope="module", params=["off", "strict"])
def served(
    request: pytest.FixtureRequest, interop: Interop, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Served]:
    made = Served(interop, request.param, tmp_path_factory.mktemp(f"served-{request.param}"))
    yield made
    made.close()


def _run_sync(interop: Interop, case: str, channel: grpc.Channel) -> None:
    with channel:
        interop.sync_cases.TestCase(case).test_interoperability(interop.test_pb2_grpc.TestServiceStub(channel), None)


def _run_aio(interop: Interop, case: str, make: Callable[[], grpc.aio.Channel]) -> None:
    async def main() -> None:
        async with make() as channel:
            stub = interop.test_pb2_grpc.TestServiceStub(channel)
            await interop.aio_cases.test_interoperability(interop.aio_cases.TestCase(case), stub, None)

    asyncio.run(main())


CASES = sorted(
    {"empty_unary", "large_unary", "server_streaming", "client_streaming", "ping_pong", "cancel_after_begin",
     "cancel_after_first_response", "timeout_on_sleeping_server", "empty_stream", "status_code_and_message",
     "unimplemented_method", "unimplemented_service", "custom_metadata", "special_status_message"}
)  # fmt: skip


@pytest.fixture(scope="module")
def plain_failures(interop: Interop, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], str]]:
    """What grpc's own channels fail, by (kind, case), against the same servicer on a plaintext meshlib server."""
    served = Served(interop, "off", tmp_path_factory.mktemp("baseline"))
    target = f"127.0.0.1:{served.endpoint.port}"
    failures: dict[tuple[str, str], str] = {}
    for case in interop.cases():
        for kind in ("sync", "aio"):
            try:
                if kind == "sync":
                    _run_sync(interop, case, grpc.insecure_channel(target))
                else:
                    _run_aio(interop, case, lambda: grpc.aio.insecure_channel(target))
            except Exception as exc:
                failures[kind, case] = f"{type(exc).__name__}: {exc}"
    served.close()
    yield failures


def test_the_release_has_the_cases_run_here(interop: Interop) -> None:
    """The list below is gRPC's: a case added to a later release fails here until it is added to CASES."""
    assert sorted(interop.cases()) == CASES
    assert sorted(c.value for c in interop.aio_cases.TestCase if c.value not in NEEDS_GOOGLE) == CASES


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", ["sync", "aio"])
def test_interop_case_through_meshlib(
    interop: Interop, plain_failures: dict[tuple[str, str], str], served: Served, kind: str, case: str
) -> None:
    if case not in interop.cases():
        pytest.skip(f"gRPC's release has no case {case}")
    if (kind, case) in plain_failures:
        pytest.skip(f"grpc's own {kind} channel fails {case} too: {plain_failures[kind, case]}")
    if kind == "sync":
        _run_sync(interop, case, served.caller.grpc_channel("interop"))
    else:
        _run_aio(interop, case, lambda: served.caller.grpc_aio_channel("interop"))


def test_the_strict_server_refuses_grpc_s_plaintext_channel(interop: Interop, served: Served) -> None:
    """The mTLS runs are mTLS: the same case over a plaintext channel to the strict server cannot pass."""
    if served.tls != "strict":
        pytest.skip("the plaintext server takes plaintext")
    with pytest.raises(grpc.RpcError) as caught:
        _run_sync(interop, "empty_unary", grpc.insecure_channel(f"127.0.0.1:{served.endpoint.port}"))
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
