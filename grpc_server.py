"""gRPC front end: WalletService.GetBalance over the shared store, plus health, reflection and a log line per call."""

import logging
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import validation
import wallet_pb2
import wallet_pb2_grpc

log = logging.getLogger("wallet.grpc")

WALLET_SERVICE = wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class WalletServicer(wallet_pb2_grpc.WalletServiceServicer):
    def __init__(self, store):
        self._store = store

    def GetBalance(self, request, context):
        try:
            uid = validation.validate_user_id(request.user_id, allow_int=False)
        except validation.ValidationError as err:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(err))
        return wallet_pb2.GetBalanceResponse(user_id=uid, balance=self._store.balance(uid))


def _log_call(method, code, started, peer):
    duration_ms = round((time.perf_counter() - started) * 1000, 1)
    log.info("grpc %s %s %.1fms peer=%s", method, code, duration_ms, peer,
             extra={"grpc_method": method, "grpc_code": code, "duration_ms": duration_ms, "peer": peer})


def _code_name(context, default):
    # context.code() is only set by abort()/set_code(); a handler that just returns leaves it None.
    code = context.code()
    return code.name if code is not None else default


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


_HANDLER_FACTORIES = {
    "unary_unary": grpc.unary_unary_rpc_method_handler,
    "unary_stream": grpc.unary_stream_rpc_method_handler,
    "stream_unary": grpc.stream_unary_rpc_method_handler,
    "stream_stream": grpc.stream_stream_rpc_method_handler,
}


class LoggingInterceptor(grpc.ServerInterceptor):
    """One INFO line per call on `wallet.grpc`: method, status code, duration and peer."""

    def intercept_service(self, continuation, handler_call_details):
        # The clock starts here, on the server's polling thread, so queueing for a worker counts too.
        started = time.perf_counter()
        method = handler_call_details.method
        handler = continuation(handler_call_details)
        if handler is None:
            # grpc answers UNIMPLEMENTED itself and never gives us a context, so there is no peer.
            _log_call(method, "UNIMPLEMENTED", started, "-")
            return None
        for kind, factory in _HANDLER_FACTORIES.items():
            behavior = getattr(handler, kind)
            if behavior is not None:
                if kind == "unary_unary":
                    return factory(self._unary(behavior, method, started),
                                   _tolerant(handler.request_deserializer), handler.response_serializer)
                return factory(self._stream(behavior, method, started), handler.request_deserializer,
                               handler.response_serializer)
        return handler

    @staticmethod
    def _unary(behavior, method, started):
        def wrapper(request, context):
            code = "UNKNOWN"  # an exception other than abort() reaches the client as UNKNOWN
            try:
                if request is _UNDECODABLE:
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  "request is not a valid message (user_id must be valid UTF-8)")
                response = behavior(request, context)
                code = _code_name(context, "OK")
                return response
            except Exception:
                code = _code_name(context, "UNKNOWN")
                raise
            finally:
                # Logged before grpc sends the status, so the line exists by the time the client sees the reply.
                _log_call(method, code, started, context.peer())

        return wrapper

    @staticmethod
    def _stream(behavior, method, started):
        # Streams (health Watch, reflection) outlive the handler call, so log when the RPC terminates.
        # A stream the client cancels (how Watch usually ends) is indistinguishable here and logs as OK.
        def wrapper(request, context, *args):
            peer = context.peer()
            context.add_callback(lambda: _log_call(method, _code_name(context, "OK"), started, peer))
            return behavior(request, context, *args)

        # Health Watch is non-blocking: grpc passes it a send callback only if the behavior carries this flag.
        for attr in ("experimental_non_blocking", "experimental_thread_pool"):
            if hasattr(behavior, attr):
                setattr(wrapper, attr, getattr(behavior, attr))
        return wrapper


class GrpcService:
    """A started gRPC server; `port` is the bound port, which differs from the requested one for port 0."""

    def __init__(self, server, port, health, executor=None):
        self.server = server
        self.port = port
        self.health = health
        self._executor = executor

    def stop(self, grace=1.0):
        # NOT_SERVING first, so load balancers stop routing here while calls in flight drain.
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()
        if self._executor is not None:
            self._executor.shutdown(wait=False)  # grpc never shuts down the pool it was given


def serve(store, host="0.0.0.0", port=9090, max_workers=16):
    """Start WalletService with health and reflection on host:port; raise OSError if the port is taken."""
    executor = ThreadPoolExecutor(max_workers, thread_name_prefix="grpc")
    # so_reuseport would let a second server silently share a taken port instead of failing.
    server = grpc.server(executor, interceptors=[LoggingInterceptor()], options=[("grpc.so_reuseport", 0)])
    wallet_pb2_grpc.add_WalletServiceServicer_to_server(WalletServicer(store), server)
    health_servicer = health.HealthServicer()
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
        raise OSError(f"gRPC port {port} on {host} is not available (already in use?)")
    server.start()
    return GrpcService(server, bound, health_servicer, executor)
