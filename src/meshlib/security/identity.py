"""This instance's identity: a short-lived certificate obtained from the control plane's CA by CSR (the private
key never leaves the process), renewed at 2/3 of its life, and swapped into the live TLS contexts.

Or, for users with their own PKI, certificate, key and roots from files (``MESH_TLS_CERT``, ``MESH_TLS_KEY``,
``MESH_TLS_CA``), reloaded when the files change.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import shutil
import ssl
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ..errors import ConfigurationError, IdentityError
from ..files import write_atomic
from ..randomness import uniform
from ..replicas import ReplicaSet, replica_client
from ..settings import split_urls
from ..wire import UNTRUSTED_HINT, error_text, refusal_text, untrusted
from .ca import load_certificates, load_private_key
from .spiffe import SpiffeId
from .tls import client_context, server_context

log = logging.getLogger("meshlib.identity")
RENEW_AT = 2 / 3


class IdentityConfigError(IdentityError):
    """Nothing to get a certificate from: retrying cannot help."""


#: An ``identity-*`` folder of the older naming (no pid in it) untouched this long is no live process's: a live
#: one rewrites its files at every renewal, at most every few days.
STALE_AFTER = 7 * 86400


def private_dir(state_dir: Path) -> Path:
    """A new private folder for this process's key and certificate files, named by its pid. The folders of
    processes that are gone (killed before they could clean up) are removed first, so a state directory holds one
    per live process instead of one per run."""
    state_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    for folder in state_dir.glob("identity-*"):
        owner, sep, _ = folder.name[len("identity-") :].partition("-")
        try:
            if sep and owner.isdigit():
                if _alive(int(owner)):
                    continue
            elif now - folder.stat().st_mtime < STALE_AFTER:
                continue
        except OSError:
            continue
        shutil.rmtree(folder, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"identity-{os.getpid()}-", dir=state_dir))


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class Identity:
    def __init__(
        self,
        spiffe_id: SpiffeId,
        state_dir: str | Path,
        *,
        control_plane: str | None,
        bootstrap_token: str | None = None,
        cert_file: str | None = None,
        key_file: str | None = None,
        ca_file: str | None = None,
        lifetime: float | None = None,
        clock: Callable[[], float] = time.time,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.verify = verify
        self.id = spiffe_id
        # Key and certificate files exist only to feed SSLContext.load_cert_chain: one private directory per
        # process (several instances of a service may share a state dir), gone with the process's temp files.
        self.dir = private_dir(Path(state_dir))
        urls = split_urls(control_plane) if control_plane else ()
        self.control_plane = ", ".join(urls) or None
        #: With several control-plane replicas: the one that signed last is asked first next time.
        self._replicas = ReplicaSet(urls) if len(urls) > 1 else None
        self.bootstrap_token = bootstrap_token
        self.files = (cert_file, key_file, ca_file) if cert_file or key_file or ca_file else None
        if self.files is not None and not all(self.files):
            raise ConfigurationError("MESH_TLS_CERT, MESH_TLS_KEY and MESH_TLS_CA go together: set all three")
        self.requested_lifetime = lifetime
        self.clock = clock
        self.client = client_context()
        self.server_strict = server_context(require_client_cert=True)
        self.server_permissive = server_context(require_client_cert=False)
        self.certificate: x509.Certificate | None = None
        self.installed_at = 0.0
        self.not_after = 0.0
        self.rotations = 0
        #: (certificate chain, private key, roots) as PEM, for TLS stacks that take bytes, not an SSLContext
        #: (gRPC's credentials). Replaced whole at each rotation; ``rotations`` says when.
        self.pem: tuple[bytes, bytes, bytes] | None = None
        self._jitter = 1.0
        self._files_mtime = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def contexts(self) -> tuple[ssl.SSLContext, ...]:
        return (self.client, self.server_strict, self.server_permissive)

    # -- lifecycle ----------------------------------------------------------------------------------

    def start(self, timeout: float = 30.0) -> Identity:
        """Get the first certificate (retrying until ``timeout``), then keep it fresh in the background."""
        deadline = time.monotonic() + timeout
        delay = 0.2
        while True:
            try:
                self.refresh()
                break
            except IdentityError as exc:
                if isinstance(exc, IdentityConfigError):  # refused (a token out of scope, say): said at once
                    raise IdentityConfigError(f"{self.id}: no certificate: {exc}") from None
                if time.monotonic() + delay > deadline:
                    raise IdentityError(
                        f"{self.id}: no certificate within {timeout:g}s: {exc}; is the control plane running "
                        "(meshctl serve), and is MESH_CONTROL_PLANE its address?"
                    ) from None
                log.warning("%s: %s; retrying", self.id, exc)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
        self._thread = threading.Thread(target=self._loop, name="meshlib-identity", daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        shutil.rmtree(self.dir, ignore_errors=True)

    def seconds_to_expiry(self) -> float | None:
        return self.not_after - self.clock() if self.certificate is not None else None

    def renew_at(self) -> float:
        """2/3 of the way from when we got the certificate to its expiry (not from its not-before, which the CA
        backdates for clock skew), less a little jitter so instances started together do not renew together."""
        return self.installed_at + (self.not_after - self.installed_at) * RENEW_AT * self._jitter

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            if self.files is not None:
                wait = 2.0
            else:
                wait = max(0.05, self.renew_at() - self.clock()) if failures == 0 else min(30.0, 0.5 * 2**failures)
            if self._stop.wait(wait):
                return
            try:
                if self.files is None or self._files_changed():
                    self.refresh()
                failures = 0
            except IdentityError as exc:
                failures += 1
                left = self.seconds_to_expiry() or 0.0
                lifetime = self.not_after - self.installed_at
                level = logging.WARNING if left > lifetime / 6 else logging.ERROR
                log.log(level, "%s: renewal failed (%s); certificate expires in %.0fs", self.id, exc, left)

    # -- obtaining ----------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Obtain a certificate now (new key, new CSR, or re-read the files) and install it."""
        with self._lock:
            if self.files is not None:
                cert_pem, key_pem, roots_pem = self._read_files()
            else:
                cert_pem, key_pem, roots_pem = self._request()
            self._install(cert_pem, key_pem, roots_pem)

    def _files_changed(self) -> bool:
        assert self.files is not None
        mtime = max(os.stat(f).st_mtime for f in self.files if f)
        return mtime != self._files_mtime

    def _read_files(self) -> tuple[bytes, bytes, bytes]:
        assert self.files is not None
        try:
            data = [Path(f).read_bytes() for f in self.files if f]
            self._files_mtime = max(os.stat(f).st_mtime for f in self.files if f)
        except OSError as exc:
            raise IdentityError(f"cannot read the certificate files: {exc}") from None
        try:
            load_certificates(data[0], str(self.files[0]))
            load_private_key(data[1], str(self.files[1]))
            load_certificates(data[2], str(self.files[2]))
        except ConfigurationError as exc:
            raise IdentityError(str(exc)) from None
        return data[0], data[1], data[2]

    def _request(self) -> tuple[bytes, bytes, bytes]:
        if not self.control_plane:
            raise IdentityConfigError("MESH_TLS needs MESH_CONTROL_PLANE (the CA) or MESH_TLS_CERT/KEY/CA files")
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.id.service)]))
            .add_extension(
                x509.SubjectAlternativeName(
                    [x509.UniformResourceIdentifier(self.id.uri), x509.DNSName(self.id.dns_name)]
                ),
                critical=False,
            )
            .sign(key, hashes.SHA256())
        )
        body: dict[str, object] = {
            "csr": csr.public_bytes(serialization.Encoding.PEM).decode(),
            "service": self.id.service,
            "namespace": self.id.namespace,
        }
        if self.requested_lifetime is not None:
            body["lifetime_seconds"] = self.requested_lifetime
        headers = {"authorization": f"Bearer {self.bootstrap_token}"} if self.bootstrap_token else {}
        try:
            with replica_client(
                self.control_plane, replicas=self._replicas, timeout=10, trust_env=False, verify=self.verify
            ) as http:
                signed = http.post("/v1/ca/sign", json=body, headers=headers)
                roots = http.get("/v1/ca/roots")
        except httpx.HTTPError as exc:
            if untrusted(exc):  # the wrong CA file: said at once, not retried for half a minute
                raise IdentityConfigError(f"cannot verify the CA at {self.control_plane}: {UNTRUSTED_HINT}") from None
            raise IdentityError(f"cannot reach the CA at {self.control_plane}: {error_text(exc)}") from None
        if signed.status_code in (401, 403):  # a missing or wrong token: retrying cannot help
            raise IdentityConfigError(f"the CA at {self.control_plane} refused the CSR: {refusal_text(signed)}")
        if signed.status_code != 200:
            raise IdentityError(f"the CA at {self.control_plane} refused the CSR: {refusal_text(signed)}")
        if roots.status_code != 200:
            raise IdentityError(f"cannot fetch the trust bundle: {roots.status_code} {roots.text[:200]}")
        payload = signed.json()
        cert_pem = (payload["certificate"] + "".join(payload.get("chain", []))).encode()
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert_pem, key_pem, "".join(roots.json()["roots"]).encode()

    def _install(self, cert_pem: bytes, key_pem: bytes, roots_pem: bytes) -> None:
        cert = load_certificates(cert_pem, "certificate")[0]
        cert_path, key_path = self.dir / "cert.pem", self.dir / "key.pem"
        write_atomic(key_path, key_pem, private=True)
        write_atomic(cert_path, cert_pem)
        write_atomic(self.dir / "roots.pem", roots_pem)
        try:
            for ctx in self.contexts:
                ctx.load_verify_locations(cadata=roots_pem.decode())
                ctx.load_cert_chain(str(cert_path), str(key_path))
        except (ssl.SSLError, ValueError) as exc:
            raise IdentityError(f"the certificate and key do not load: {exc}") from None
        finally:
            # the key lives on in the contexts (in memory); on disk it existed only for load_cert_chain
            key_path.unlink(missing_ok=True)
        self.certificate = cert
        self.pem = (cert_pem, key_pem, roots_pem)
        self.installed_at = self.clock()
        self.not_after = cert.not_valid_after_utc.timestamp()
        self._jitter = 1.0 - uniform() * 0.05
        self.rotations += 1
        left = dt.timedelta(seconds=int(self.not_after - self.installed_at))
        log.info("%s: certificate %x installed, expires in %s", self.id, cert.serial_number, left)
