"""The server half for gRPC as plain decisions, shared by the sync and grpc.aio interceptors.

It reuses the HTTP server half (``meshlib.inbound.admit``): the same deadline, authorization and trace decisions,
fed from gRPC's metadata and auth context. Identity is the URI SAN of the verified client certificate
(``x509_pem_cert``), never gRPC's ``x509_subject_alternative_name``, which mixes URI, DNS and IP names.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import grpc

from ..inbound import Admission, admit
from ..policy.deadline import MAX_INCOMING_DEADLINE
from ..runtime import Runtime
from ..security.spiffe import SpiffeId
from ..security.tls import identity_from_pem
from .status import HTTP_EQUIVALENT

#: ``admit``'s own replies (the handler never runs) as gRPC statuses.
_REPLY_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    403: grpc.StatusCode.PERMISSION_DENIED,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


_NO_DEADLINE = 1e9


def peer_of(context: Any) -> SpiffeId | None:
    """The caller's mesh identity from the handshake (None: plaintext, or TLS without a client certificate)."""
    try:
        auth = context.auth_context()
    except Exception:
        return None
    pems = auth.get("x509_pem_cert") if auth else None
    if not pems:
        return None
    return identity_from_pem(pems[0])


def admit_rpc(mesh: Runtime, method: str, context: Any) -> Admission:
    """Everything decided before the handler runs. ``adm.reply`` set: refuse with ``refusal(adm)``."""
    metadata: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str) and key not in metadata:
            metadata[key] = value
    adm = admit(mesh, "POST", method, metadata.get, peer_of(context), metadata)
    adm.rpc = True
    if adm.reply is None:
        remaining = context.time_remaining()
        # gRPC's own deadline and x-mesh-deadline: the earlier one holds. No deadline reads as ~2^63 ns.
        if remaining is not None and remaining < _NO_DEADLINE:
            grpc_deadline = time.time() + min(remaining, MAX_INCOMING_DEADLINE)
            if adm.deadline is None or grpc_deadline < adm.deadline:
                adm.deadline = grpc_deadline
        span = adm.span
        if span is not None and span.is_recording():
            name = method.lstrip("/")
            rpc_service, _, rpc_method = name.partition("/")
            span.update_name(name)
            span.set_attribute("rpc.system", "grpc")
            span.set_attribute("rpc.service", rpc_service)
            span.set_attribute("rpc.method", rpc_method)
    return adm


def admit_or_refuse(mesh: Runtime, method: str, context: Any) -> tuple[Admission, tuple[grpc.StatusCode, str] | None]:
    """``admit_rpc``, and when the handler must not run, the (already recorded) status and details to abort with."""
    adm = admit_rpc(mesh, method, context)
    reply = adm.reply
    if reply is None:
        return adm, None
    code = _REPLY_CODES.get(reply.status, grpc.StatusCode.INTERNAL)
    finish_rpc(adm, code)
    return adm, (code, f"{mesh.service}: " + reply.body.decode("utf-8", "replace"))


Wrap = Callable[[Runtime, str, Callable[..., Any]], Callable[..., Any]]


def rewrap(handler: Any, mesh: Runtime, method: str, unary: Wrap, streaming: Wrap) -> Any:
    """A method handler like ``handler`` whose behaviour runs inside the mesh's admission (``unary`` for one
    response, ``streaming`` for a stream of them): the interceptors' one job."""
    serializers = (handler.request_deserializer, handler.response_serializer)
    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(unary(mesh, method, handler.unary_unary), *serializers)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(unary(mesh, method, handler.stream_unary), *serializers)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(streaming(mesh, method, handler.unary_stream), *serializers)
    return grpc.stream_stream_rpc_method_handler(streaming(mesh, method, handler.stream_stream), *serializers)


def finish_rpc(adm: Admission, code: grpc.StatusCode | None) -> None:
    """After the handler: the server span's status, then metrics and the access log line."""
    code = code or grpc.StatusCode.OK
    span = adm.span
    if span is not None and span.is_recording():
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in (
            grpc.StatusCode.UNKNOWN,
            grpc.StatusCode.INTERNAL,
            grpc.StatusCode.UNAVAILABLE,
            grpc.StatusCode.DATA_LOSS,
            grpc.StatusCode.DEADLINE_EXCEEDED,
            grpc.StatusCode.UNIMPLEMENTED,
        ):
            from opentelemetry.trace import StatusCode

            span.set_status(StatusCode.ERROR, code.name)
    adm.finish(HTTP_EQUIVALENT.get(code, 500), route=adm.path)


def code_from_context(context: Any, error: BaseException | None) -> grpc.StatusCode:
    """The status the handler ended with: what it set (or aborted with) on the context, else OK, or UNKNOWN when
    it raised."""
    code = None
    getter = getattr(context, "code", None)
    if getter is not None:
        try:
            code = getter()
        except Exception:
            code = None
    if isinstance(code, grpc.StatusCode):
        return code
    if error is not None:
        return grpc.StatusCode.UNKNOWN
    return grpc.StatusCode.OK


def server_credentials(mesh: Runtime) -> grpc.ServerCredentials | None:
    """The mesh identity as gRPC server credentials, following rotations (gRPC asks at each new handshake);
    None when the mesh's TLS is off. gRPC cannot take plaintext and TLS on one port, so a permissive gRPC server
    is TLS-only and is advertised as such; and grpcio can either require a client certificate or never ask for
    one (no "request, don't require"), so permissive requires one as strict does: never asking would leave every
    mesh caller without an identity, and authorization would deny valid callers."""
    identity = mesh.identity
    if identity is None:
        return None
    assert identity.pem is not None

    def configuration() -> grpc.ServerCertificateConfiguration:
        assert identity is not None and identity.pem is not None
        cert, key, roots = identity.pem
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)

    served = [identity.rotations]

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        assert identity is not None
        if identity.rotations == served[0]:
            return None  # unchanged: keep the current one
        served[0] = identity.rotations
        return configuration()

    return grpc.dynamic_ssl_server_credentials(configuration(), fetch, require_client_authentication=True)


def advertised_tls(mesh: Runtime) -> str:
    """``mesh_tls`` in discovery: a TLS-only port (strict, or permissive — see ``server_credentials``) is
    advertised as ``strict``, so plaintext callers are told to turn mesh TLS on rather than fail to connect."""
    return "off" if mesh.identity is None else "strict"
