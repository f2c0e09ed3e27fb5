"""gRPC front end: WalletService.GetBalance over the shared store, plus health, reflection and a log line per call.

One interceptor does the per-call work (authentication, the held-open-stream limits, the log line). It wraps
each method's handler once and reuses it, so a call costs a dict lookup, not a new handler.

Why the limits (CONTRACT.md section 5): a sync gRPC server runs a blocking stream (reflection) on a pool
thread for as long as the client holds it open. With one small pool, a few idle streams took every thread
and unary calls queued forever. Now streams run on a pool of their own (grpc's per-method
`experimental_thread_pool`), held-open streams are counted per connection and in total, the unary pool
stays small (more threads than cores only add GIL contention: 216 threads served a third fewer calls/s
than 16), and `maximum_concurrent_rpcs` bounds the queue; past any limit the call is answered
RESOURCE_EXHAUSTED at once.
"""

import contextvars
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import logs
import validation
import wallet_pb2
import wallet_pb2_grpc
from auth import Auth, Principal
from errors import GRPC_STATUS, ServiceError

log = logging.getLogger("wallet.grpc")

WALLET_SERVICE = wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
GET_BALANCE = f"/{WALLET_SERVICE}/GetBalance"

# Threads for unary calls: enough to keep both cores busy (measured: more only adds GIL contention).
UNARY_WORKERS = 16
# Stream threads beyond one per allowed stream, so refusing a stream past the limit never waits for a thread.
_SPARE_STREAM_WORKERS = 8
# Held-open streams (reflection, health Watch): per client connection and in total.
MAX_STREAMS_PER_CONNECTION = 100
MAX_STREAMS = 200
# Unary calls waiting for a worker beyond which new calls are refused rather than queued (~0.2 s of work).
MAX_QUEUED_CALLS = 1000
# HTTP/2 streams one connection may have open at once: a transport backstop above the per-connection
# stream limit plus room for that connection's unary calls, so the limit above answers first.
MAX_HTTP2_STREAMS = 256
# Client-chosen method names longer than this are cut in log lines (the escaping already keeps them one line).
_LOGGED_NAME_LIMIT = 256

# Set on grpc's polling thread when a call arrives; grpc runs the handler in the same per-call context,
# so the logged duration includes the time the call waited for a worker.
_started: contextvars.ContextVar[float] = contextvars.ContextVar("grpc_call_started")


def _open_service(method: str) -> bool:
    """Health and reflection stay open with authentication on (load balancers and grpcurl list)."""
    service = method.split("/")[1] if method.count("/") >= 2 else ""
    return service == HEALTH_SERVICE or service.startswith("grpc.reflection.")


def _authorize_get_balance(principal: Principal, request: Any) -> None:
    principal.require("read_user", request.user_id)


def _authorize_operator(principal: Principal, request: Any) -> None:
    # Any protected method without its own rule is for operators only (fail closed).
    principal.require("write")


# Method -> the authorization rule of auth.py that applies to it.
_AUTHORIZATION: dict[str, Callable[[Principal, Any], None]] = {GET_BALANCE: _authorize_get_balance}


def _abort(context: grpc.ServicerContext, err: ServiceError) -> None:
    context.abort(GRPC_STATUS.get(err.code, grpc.StatusCode.INTERNAL), err.message)


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, store) -> None:
        self._store = store

    def GetBalance(self, request, context):
        try:
            uid = validation.validate_user_id(request.user_id)
            return wallet_pb2.GetBalanceResponse(user_id=uid, balance=self._store.balance(uid))
        except ServiceError as err:  # invalid user_id, store unavailable: the contract code's gRPC status
            _abort(context, err)
        except Exception:
            log.error("GetBalance failed", exc_info=True)
            context.abort(grpc.StatusCode.INTERNAL, "internal error")


def _log_call(method: str, code: str, started: float, peer: str, caller: str) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    logs.access(log, "grpc %s %s %.1fms peer=%s caller=%s", (method, code, duration_ms, peer, caller),
                {"grpc_method": method, "grpc_code": code, "duration_ms": duration_ms, "peer": peer, "caller": caller})


def _code_name(context: grpc.ServicerContext, default: str) -> str:
    # context.code() is only set by abort()/set_code(); a handler that just returns leaves it None.
    code = context.code()
    return code.name if code is not None else default


def _logged_name(method: str) -> str:
    if len(method) > _LOGGED_NAME_LIMIT:
        method = method[:_LOGGED_NAME_LIMIT] + "..."
    return logs.printable(method)


_UNDECODABLE = object()


def _tolerant(deserializer):
    """A request that does not parse is the client's mistake: INVALID_ARGUMENT and a log line, not a traceback."""
    if deserializer is None:
        return None

    def deserialize(data):
        try:
            return deserializer(data)
        except Exception:
            return _UNDECODABLE

    return deserialize


class StreamLimits:
    """Counts held-open streams per connection (grpc's peer string names one TCP connection) and in total."""

    def __init__(self, per_connection: int, total: int) -> None:
        self.per_connection = per_connection
        self.total = total
        self._lock = threading.Lock()
        self._open = 0
        self._by_peer: dict[str, int] = {}

    def acquire(self, peer: str) -> bool:
        with self._lock:
            held = self._by_peer.get(peer, 0)
            if held >= self.per_connection or self._open >= self.total:
                return False
            self._by_peer[peer] = held + 1
            self._open += 1
            return True

    def release(self, peer: str) -> None:
        with self._lock:
            held = self._by_peer.get(peer, 0) - 1
            if held > 0:
                self._by_peer[peer] = held
            else:
                self._by_peer.pop(peer, None)
            self._open -= 1

    @property
    def open(self) -> int:
        return self._open


class Interceptor(grpc.ServerInterceptor):
    """Authentication, stream limits and one INFO line per call on `wallet.grpc` (method, code, duration, peer)."""

    def __init__(self, auth: Auth, limits: StreamLimits, stream_pool: ThreadPoolExecutor | None = None) -> None:
        self._auth = auth
        self._limits = limits
        self._stream_pool = stream_pool
        # method -> wrapped handler. Only methods that have a handler get an entry, so clients cannot grow it.
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        _started.set(time.perf_counter())
        method = handler_call_details.method
        wrapped = self._handlers.get(method)
        if wrapped is not None:
            return wrapped
        handler = continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself and never gives us a context, so there is no peer.
            _log_call(_logged_name(method), "UNIMPLEMENTED", _started.get(), "-", "-")
            return None
        wrapped = self._wrap(method, handler)
        self._handlers[method] = wrapped
        return wrapped

    def _wrap(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        name = _logged_name(method)
        protected = self._auth.enabled and not _open_service(method)
        authorize = _AUTHORIZATION.get(method, _authorize_operator) if protected else None
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(handler.unary_unary, name, authorize),
                _tolerant(handler.request_deserializer), handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._stream(handler.unary_stream, name, authorize),
                handler.request_deserializer, handler.response_serializer)
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._stream(handler.stream_unary, name, authorize),
                handler.request_deserializer, handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._stream(handler.stream_stream, name, authorize),
            handler.request_deserializer, handler.response_serializer)

    def _principal(self, context: grpc.ServicerContext) -> Principal:
        credentials = [value for key, value in context.invocation_metadata() if key == "authorization"]
        try:
            if len(credentials) > 1:
                raise ServiceError("send one authorization entry, not several", code="unauthorized")
            return self._auth.authenticate_header(credentials[0] if credentials else None)
        except ServiceError as err:
            _abort(context, err)
            raise  # abort() raises; this line only tells type checkers

    def _unary(self, behavior, name: str, authorize):
        principal_of = self._principal

        def wrapper(request, context):
            started = _started.get(None) or time.perf_counter()
            code = "UNKNOWN"  # an exception other than abort() reaches the client as UNKNOWN
            caller = "-"
            try:
                principal = None
                if authorize is not None:  # before anything looks at the request: 401 before 400
                    principal = principal_of(context)
                    caller = principal.name
                if request is _UNDECODABLE:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  "request is not a valid message (user_id must be valid UTF-8)")
                if principal is not None:
                    try:
                        authorize(principal, request)
                    except ServiceError as err:
                        _abort(context, err)
                response = behavior(request, context)
                code = _code_name(context, "OK")
                return response
            except Exception:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                # Logged before grpc sends the status, so the line exists by the time the client sees the reply.
                _log_call(name, code, started, context.peer(), caller)

        return wrapper

    def _stream(self, behavior, name: str, authorize):
        principal_of = self._principal
        limits = self._limits

        # Streams (health Watch, reflection) outlive the handler call, so they are logged when the RPC
        # terminates. A stream the client cancels (how Watch usually ends) logs as OK.
        def wrapper(request, context, *args):
            started = _started.get(None) or time.perf_counter()
            peer = context.peer()
            caller = "-"
            try:
                if authorize is not None:
                    principal = principal_of(context)
                    caller = principal.name
                    try:
                        authorize(principal, None)
                    except ServiceError as err:
                        _abort(context, err)
                if not limits.acquire(peer):
                    context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                  f"too many open streams (at most {limits.per_connection} per connection "
                                  f"and {limits.total} in all): close one and retry")
            except Exception:
                _log_call(name, _code_name(context, "UNKNOWN"), started, peer, caller)
                raise

            def finished():
                limits.release(peer)
                _log_call(name, _code_name(context, "OK"), started, peer, caller)

            if not context.add_callback(finished):
                finished()  # the RPC already ended (client gone): nothing will call it later
            return behavior(request, context, *args)

        # Health Watch is non-blocking: grpc passes it a send callback only if the behavior carries this flag.
        if hasattr(behavior, "experimental_non_blocking"):
            wrapper.experimental_non_blocking = behavior.experimental_non_blocking
        # grpc runs a behavior on its experimental_thread_pool when it has one: streams never take unary threads.
        own_pool = getattr(behavior, "experimental_thread_pool", None)
        wrapper.experimental_thread_pool = own_pool if isinstance(own_pool, ThreadPoolExecutor) else self._stream_pool
        return wrapper


class GrpcService:
    """A started gRPC server; `port` is the bound port, which differs from the requested one for port 0."""

    def __init__(self, server: grpc.Server, port: int, health: health.HealthServicer,
                 executors: tuple[ThreadPoolExecutor, ...] = (), limits: StreamLimits | None = None) -> None:
        self.server = server
        self.port = port
        self.health = health
        self.limits = limits
        self._executors = executors

    def stop(self, grace: float | None = 1.0) -> None:
        # NOT_SERVING first, so load balancers stop routing here while calls in flight drain.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        for executor in self._executors:
            executor.shutdown(wait=False)  # grpc never shuts down the pools it was given


def serve(store, host: str = "0.0.0.0", port: int = 9090, *, auth: Auth | None = None,
          unary_workers: int = UNARY_WORKERS, max_streams: int = MAX_STREAMS,
          max_streams_per_connection: int = MAX_STREAMS_PER_CONNECTION,
          max_queued_calls: int = MAX_QUEUED_CALLS) -> GrpcService:
    """Start WalletService with health and reflection on host:port; raise OSError if the port is taken.

    `auth` None means authentication off (the same as `Auth()`).
    """
    auth = auth if auth is not None else Auth()
    limits = StreamLimits(max_streams_per_connection, max_streams)
    executor = ThreadPoolExecutor(unary_workers, thread_name_prefix="grpc")
    # A thread per allowed stream (ThreadPoolExecutor starts threads only when work arrives: idle cost nil).
    stream_pool = ThreadPoolExecutor(max_streams + _SPARE_STREAM_WORKERS, thread_name_prefix="grpc-stream")
    server = grpc.server(
        executor,
        interceptors=[Interceptor(auth, limits, stream_pool)],
        maximum_concurrent_rpcs=max_streams + unary_workers + max_queued_calls,
        options=[
            ("grpc.so_reuseport", 0),  # else a second server silently shares a taken port instead of failing
            ("grpc.max_concurrent_streams", max(MAX_HTTP2_STREAMS, max_streams_per_connection + unary_workers)),
        ])
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(WalletServicer(store), server)
    # Non-blocking Watch (the default): a watcher holds no thread between updates.
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    for service in ("", WALLET_SERVICE):
        health_servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((WALLET_SERVICE, HEALTH_SERVICE, reflection.SERVICE_NAME), server)

    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"  # IPv6 literals need brackets
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError:
        bound = 0
    if not bound:
        server.stop(None)
        executor.shutdown(wait=False)
        stream_pool.shutdown(wait=False)
        raise OSError(f"gRPC port {port} on {host} is not available (already in use?)")
    server.start()
    return GrpcService(server, bound, health_servicer, (executor, stream_pool), limits)
