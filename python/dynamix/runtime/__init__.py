"""Dynamo-shaped runtime API (python-sdk spec §2-§5): ``DistributedRuntime``, endpoints, handlers,
clients. The I/O runs in ``dynamix._core`` on a background tokio runtime; this module keeps Dynamo's
Python surface and drives handlers on the user's event loop.
"""

from __future__ import annotations

import asyncio
import atexit
import functools
import inspect
import logging
import os
import re
import signal
import uuid
import warnings
from typing import Any, AsyncIterator, Callable, Optional

from dynamix import _core
from dynamix.llm.exceptions import (
    Cancelled,
    DynamoException,
    EngineShutdown,
    HttpError,
    InvalidArgument,
    _error_for,
)

__all__ = [
    "Annotated",
    "Client",
    "Component",
    "Context",
    "DistributedRuntime",
    "Endpoint",
    "Namespace",
    "dynamo_endpoint",
    "dynamo_worker",
]

log = logging.getLogger("dynamix.runtime")

# Background threads complete awaitables by calling into Python; give any that is doing so at exit
# the moment it needs before the interpreter finalizes.
atexit.register(_core.quiesce, 50)

_NAME = re.compile(r"^[a-z0-9_-]+$")
_BACKENDS = {"etcd": "etcd", "kv_store": "etcd", "mem": "mem"}


def _check_name(kind: str, value: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{kind} name {value!r} must match ^[a-z0-9_-]+$")
    return value


def _env_float(name: str, default: float) -> float:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name} = {text!r} is not a number") from None
    if not value > 0:
        raise ValueError(f"{name} = {text!r} must be positive")
    return value


def _env_int(name: str, default: int, minimum: int = 0) -> int:
    text = os.environ.get(name)
    if text is None or text.strip() == "":
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{name} = {text!r} is not an integer") from None
    if value < minimum:
        raise ValueError(f"{name} = {text!r} must be at least {minimum}")
    return value


# One core runtime per backend per process: several DistributedRuntime objects share it (spec §2.1).
_CORES: dict = {}
_CURRENT: Optional["DistributedRuntime"] = None


def _core_runtime(backend: str) -> "_core.Runtime":
    core = _CORES.get(backend)
    if core is None:
        endpoints = [
            e.strip()
            for e in os.environ.get("ETCD_ENDPOINTS", "http://127.0.0.1:2379").split(",")
            if e.strip()
        ]
        port = _env_int("DYN_DISTRIBUTED__REQUEST_PLANE_PORT", 0)
        if port > 65535:
            raise ValueError(f"DYN_DISTRIBUTED__REQUEST_PLANE_PORT = {port} is not a TCP port")
        core = _core.Runtime(
            backend,
            endpoints,
            os.environ.get("DYN_TCP_RPC_HOST", "127.0.0.1"),
            port,
            _env_int("DYN_DISTRIBUTED__LEASE_TTL_SECS", 10, minimum=2),
            _env_float("DYN_TCP_CONNECT_TIMEOUT", 5.0),
            _env_float("DYN_TCP_REQUEST_TIMEOUT", 5.0),
            _env_int("DYN_TCP_MAX_MESSAGE_SIZE", 32 * 1024 * 1024, minimum=1024),
            os.environ.get("NATS_SERVER") if backend == "etcd" else None,
        )
        _CORES[backend] = core
    return core


class DistributedRuntime:
    """The process's connection to its deployment (spec §2)."""

    def __init__(
        self,
        event_loop: Any = None,
        discovery_backend: Any = "etcd",
        request_plane: str = "tcp",
        enable_nats: Optional[bool] = None,
        *,
        event_plane: Optional[str] = None,
        response_plane: Optional[str] = None,
    ) -> None:
        global _CURRENT
        if isinstance(discovery_backend, bool):
            # Legacy DistributedRuntime(loop, is_static).
            if discovery_backend:
                raise ValueError(
                    "static mode (is_static=True) is not supported: dynamix needs discovery; "
                    'use discovery_backend="mem" for one process'
                )
            discovery_backend = "etcd"
        backend = _BACKENDS.get(discovery_backend)
        if backend is None:
            raise ValueError(
                f"discovery_backend {discovery_backend!r} is not supported "
                "(accepted: 'etcd', 'kv_store', 'mem')"
            )
        if request_plane != "tcp":
            raise ValueError(f"request_plane {request_plane!r} is not supported (accepted: 'tcp')")
        if event_plane not in (None, "nats"):
            raise ValueError(f"event_plane {event_plane!r} is not supported (accepted: 'nats', None)")
        if response_plane not in (None, "tcp"):
            raise ValueError(
                f"response_plane {response_plane!r} is not supported (accepted: 'tcp', None)"
            )
        if event_loop is None:
            event_loop = asyncio.get_running_loop()
        self._loop = event_loop
        self._core = _core_runtime(backend)
        self._backend = backend
        self._serving: list = []
        self._shutdown = asyncio.Event() if _loop_running(event_loop) else None
        self._shutting_down = False
        self._skip_grace = False
        self._health = True
        _CURRENT = self

    @staticmethod
    def detached() -> "DistributedRuntime":
        """The runtime that already exists in this process."""
        if _CURRENT is None:
            raise RuntimeError("no DistributedRuntime exists in this process")
        return _CURRENT

    def event_loop(self) -> Any:
        return self._loop

    def endpoint(self, path: str) -> "Endpoint":
        if not isinstance(path, str):
            raise TypeError(f"endpoint path must be a string, not {type(path).__name__}")
        text = path[len("dyn://"):] if path.startswith("dyn://") else path
        parts = text.split(".")
        if len(parts) != 3:
            raise ValueError(
                f"endpoint path {path!r} must be namespace.component.endpoint (three parts)"
            )
        ns, comp, ep = parts
        return Endpoint(self, _check_name("namespace", ns), _check_name("component", comp),
                        _check_name("endpoint", ep))

    def namespace(self, name: str) -> "Namespace":
        return Namespace(self, _check_name("namespace", name))

    def set_health_status(self, ready: bool) -> None:
        self._health = bool(ready)

    def instance_id(self) -> int:
        return self._core.instance_id

    def shutdown(self) -> None:
        """Start a graceful shutdown; returns at once."""
        if self._shutting_down:
            self._skip_grace = True
        self._shutting_down = True
        event = self._event()
        self._loop.call_soon_threadsafe(event.set)

    def _event(self) -> asyncio.Event:
        if self._shutdown is None:
            self._shutdown = asyncio.Event()
        return self._shutdown

    async def _close(self) -> None:
        """Revoke the lease (every key of this process goes at once). Blocking, on purpose: it is the
        last call before the process exits, and nothing may still be completing in the background
        when the interpreter finalizes."""
        try:
            self._core.revoke_blocking()
        except Exception as e:  # the process is ending: say so, do not fail
            log.warning("could not revoke the lease: %s", e)
        _CORES.pop(self._backend, None)


def _loop_running(loop: Any) -> bool:
    try:
        return loop.is_running()
    except Exception:
        return False


class Namespace:
    """Legacy ``runtime.namespace(ns).component(comp).endpoint(ep)``."""

    def __init__(self, runtime: DistributedRuntime, name: str) -> None:
        self._runtime = runtime
        self.name = name

    def component(self, name: str) -> "Component":
        return Component(self._runtime, self.name, _check_name("component", name))


class Component:
    def __init__(self, runtime: DistributedRuntime, namespace: str, name: str) -> None:
        self._runtime = runtime
        self.namespace = namespace
        self.name = name

    def endpoint(self, name: str) -> "Endpoint":
        return Endpoint(self._runtime, self.namespace, self.name, _check_name("endpoint", name))

    async def create_service(self) -> None:
        return None


class Context:
    """A request's context (spec §4.2); ``Context()`` on the client side (spec §5.3)."""

    def __init__(self, id: Optional[str] = None, metadata: Optional[dict] = None, *,
                 _control: Any = None, _headers: Optional[dict] = None) -> None:
        self._id = id or str(uuid.uuid4())
        self._control = _control if _control is not None else _core.Control()
        self.metadata = dict(metadata or {})
        headers = _headers or {}
        for key, value in headers.items():
            if key.lower().startswith("x-dynamo-meta-"):
                self.metadata.setdefault(key[len("x-dynamo-meta-"):], value)
        self.trace_id, self.span_id, self.parent_span_id = _trace(headers)

    def id(self) -> str:
        return self._id

    def is_stopped(self) -> bool:
        return self._control.is_stopped()

    def is_killed(self) -> bool:
        return self._control.is_killed()

    def stop_generating(self) -> None:
        self._control.stop()

    def kill(self) -> None:
        self._control.kill()

    async def async_killed_or_stopped(self) -> bool:
        return await self._control.wait()

    def __repr__(self) -> str:
        return f"Context(id={self._id!r}, stopped={self.is_stopped()}, killed={self.is_killed()})"


def _trace(headers: dict) -> tuple:
    parent = headers.get("traceparent")
    if not parent:
        return None, None, None
    parts = parent.split("-")
    if len(parts) != 4:
        return None, None, None
    return parts[1], None, parts[2]


class Annotated:
    """One response item with its envelope (spec §5.2)."""

    __slots__ = ("_data", "_event", "_comment", "_id")

    def __init__(self, data: Any = None, event: Optional[str] = None,
                 comment: Optional[list] = None, id: Optional[str] = None) -> None:
        self._data = data
        self._event = event
        self._comment = list(comment or [])
        self._id = id

    @classmethod
    def _from_envelope(cls, envelope: dict) -> "Annotated":
        return cls(envelope.get("data"), envelope.get("event"), envelope.get("comment"),
                   envelope.get("id"))

    def data(self) -> Any:
        return self._data

    def event(self) -> Optional[str]:
        return self._event

    def comments(self) -> list:
        return list(self._comment)

    def id(self) -> Optional[str]:
        return self._id

    def is_error(self) -> bool:
        return self._event == "error"

    def __repr__(self) -> str:
        return (f"Annotated(data={self._data!r}, event={self._event!r}, "
                f"comment={self._comment!r}, id={self._id!r})")


# ---- serving -------------------------------------------------------------------------------------

def _unwrap(handler: Callable) -> Callable:
    target = handler
    while isinstance(target, functools.partial):
        target = target.func
    return getattr(target, "__func__", target)


def _wants_context(handler: Callable) -> bool:
    try:
        signature = inspect.signature(handler)
    except (TypeError, ValueError):
        return False
    for parameter in signature.parameters.values():
        if parameter.name == "context" or parameter.kind is inspect.Parameter.VAR_KEYWORD:
            return True
    return False


def _classify(error: BaseException) -> tuple:
    """(error_type, class, reason, message, status) of a handler's exception, as Dynamo's bindings
    do; status is the HttpError's code, else None."""
    text = f"{type(error).__name__}: {error}"
    if isinstance(error, HttpError):
        code = error.code
        kinds = {
            400: ("InvalidArgument", "InvalidRequest", "request.invalid_argument"),
            404: ("NotFound", "NotFound", "request.not_found"),
            413: ("PayloadTooLarge", "PayloadTooLarge", "request.payload_too_large"),
            415: ("UnsupportedMedia", "UnsupportedMedia", "request.unsupported_media"),
            429: ("WorkerOverloaded", "CapacityExhausted", "capacity.worker_overloaded"),
            501: ("NotImplemented", "NotImplemented", "runtime.not_implemented"),
            503: ("Unavailable", "Unavailable", "backend.unavailable"),
            504: ("ResponseTimeout", "DeadlineExceeded", "backend.response_timeout"),
        }
        kind = kinds.get(code)
        if kind is None:
            kind = kinds[400] if 400 <= code < 500 else ("Internal", "Internal", "runtime.internal")
        return (*kind, error.message, code)
    if isinstance(error, (ValueError, TypeError, InvalidArgument)):
        return ("InvalidArgument", "InvalidRequest", "request.invalid_argument", text, None)
    if isinstance(error, (asyncio.CancelledError, Cancelled)):
        return ("Cancelled", "Cancelled", "request.cancelled", text, None)
    if isinstance(error, (EngineShutdown, ConnectionError, TimeoutError, GeneratorExit)):
        return ("Disconnected", "Unavailable", "backend.unavailable", text, None)
    return ("Internal", "Internal", "runtime.internal", text, None)


class _InvalidResponse(RuntimeError):
    """A handler yielded a value that is not JSON."""


class _Driver:
    """Runs one endpoint's handler for each request, on the runtime's loop (spec §4, §9.5)."""

    def __init__(self, endpoint: "Endpoint", handler: Callable) -> None:
        self.endpoint = endpoint
        self.handler = handler
        self.with_context = _wants_context(handler)
        self.loop = endpoint._runtime._loop
        self.tasks: set = set()

    def dispatch(self, request_id, body, headers, metadata, control, sink) -> None:
        """Called by the core (any thread): start the request's task on the loop."""
        self.loop.call_soon_threadsafe(self._start, request_id, body, headers, metadata, control,
                                       sink)

    def _start(self, request_id, body, headers, metadata, control, sink) -> None:
        meta = dict(metadata or {})
        context = Context(request_id, meta, _control=control, _headers=headers)
        task = self.loop.create_task(self._run(body, context, sink))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, body: Any, context: Context, sink: Any) -> None:
        generator = None
        stopped = False
        try:
            if self.with_context:
                generator = self.handler(body, context=context)
            else:
                generator = self.handler(body)
            if not hasattr(generator, "__anext__"):
                if inspect.iscoroutine(generator):
                    generator.close()
                raise TypeError(
                    f"the handler returned {type(generator).__name__}, not an async generator"
                )
            while True:
                try:
                    item = await generator.__anext__()
                except StopAsyncIteration:
                    break
                try:
                    if isinstance(item, dict) and item.get("_dynamo_annotated") is True:
                        delivered = await sink.send_annotated(item)
                    elif sink.try_send(item):
                        delivered = True
                    else:
                        delivered = await sink.send(item)
                except TypeError as e:
                    # The handler's bug, not the caller's: an internal error (Dynamo's "invalid
                    # response object").
                    raise _InvalidResponse(str(e)) from None
                if not delivered or context.is_stopped():
                    stopped = True
                    break
            if stopped:
                # One more pull so a handler that checks is_stopped() after an await can return;
                # what it yields is discarded (spec §4.3).
                try:
                    await generator.__anext__()
                except StopAsyncIteration:
                    generator = None
                except Exception:
                    pass
                if generator is not None:
                    await generator.aclose()
            sink.close()
        except BaseException as error:  # every failure becomes an error item, never a lost request
            if stopped or context.is_stopped():
                sink.close()
                if isinstance(error, (KeyboardInterrupt, SystemExit)):
                    raise
                return
            error_type, klass, reason, message, status = _classify(error)
            if error_type == "Internal" or not isinstance(error, Exception):
                log.error("handler of %s failed on request %s", self.endpoint, context.id(),
                          exc_info=error)
            else:
                log.warning("handler of %s rejected request %s: %s", self.endpoint,
                            context.id(), message)
            try:
                await sink.error(error_type, klass, reason, message, status)
            except Exception as send_error:
                log.warning("could not report the error of request %s: %s", context.id(),
                            send_error)
            if generator is not None and hasattr(generator, "aclose"):
                try:
                    await generator.aclose()
                except Exception:
                    pass
            if isinstance(error, (KeyboardInterrupt, SystemExit)):
                raise


class Endpoint:
    """One endpoint ``ns.comp.ep`` (spec §3)."""

    def __init__(self, runtime: DistributedRuntime, namespace: str, component: str,
                 name: str) -> None:
        self._runtime = runtime
        self.namespace = namespace
        self.component = component
        self.name = name

    def __str__(self) -> str:
        return f"dyn://{self.namespace}.{self.component}.{self.name}"

    def __repr__(self) -> str:
        return f"Endpoint({str(self)!r})"

    @property
    def _names(self) -> tuple:
        return self.namespace, self.component, self.name

    def connection_id(self) -> int:
        return self._runtime._core.instance_id

    lease_id = connection_id

    async def serve_endpoint(self, handler: Callable, graceful_shutdown: bool = True,
                             metrics_labels: Any = None, health_check_payload: Any = None) -> None:
        target = _unwrap(handler)
        if inspect.iscoroutinefunction(target) or (
            inspect.isfunction(target) and not inspect.isasyncgenfunction(target)
        ):
            raise TypeError(
                f"the handler of {self} must be an async generator function "
                f"(async def ... yield), not {getattr(target, '__qualname__', target)!r}"
            )
        runtime = self._runtime
        if runtime._shutdown is None:
            runtime._shutdown = asyncio.Event()
        driver = _Driver(self, handler)
        await runtime._core.serve(*self._names, driver.dispatch)
        runtime._serving.append(self)
        log.info("serving %s as instance %x", self, runtime._core.instance_id)
        try:
            await runtime._event().wait()
        finally:
            await self._drain(graceful_shutdown)

    async def _drain(self, graceful: bool) -> None:
        runtime = self._runtime
        core = runtime._core
        try:
            await core.unregister_instance(*self._names)
            await _delete_cards(runtime, self)
        except Exception as e:
            log.warning("could not leave discovery for %s: %s", self, e)
        grace = 0.0 if runtime._skip_grace else _grace_period()
        if grace > 0:
            try:
                await asyncio.wait_for(_until_skip(runtime), grace)
            except asyncio.TimeoutError:
                pass
        left = await core.stop_serving(*self._names, graceful, None)
        if left:
            log.warning("%s stopped with %d requests still running", self, left)
        if self in runtime._serving:
            runtime._serving.remove(self)

    async def unregister_endpoint_instance(self) -> None:
        await self._runtime._core.unregister_instance(*self._names)

    async def register_endpoint_instance(self) -> None:
        await self._runtime._core.register_instance(*self._names)

    async def client(self, router_mode: Any = None) -> "Client":
        watch = await self._runtime._core.watch(*self._names)
        return Client(self, watch, router_mode)


def _grace_period() -> float:
    name = "DYN_GRACEFUL_SHUTDOWN_GRACE_PERIOD_SECS"
    text = os.environ.get(name, "").strip()
    if not text:
        return 5.0
    try:
        value = float(text)
    except ValueError:
        log.warning("%s = %r is not a number; using 5 s", name, text)
        return 5.0
    if not value >= 0:
        log.warning("%s = %r must not be negative; using 5 s", name, text)
        return 5.0
    return value


async def _until_skip(runtime: DistributedRuntime) -> None:
    while not runtime._skip_grace:
        await asyncio.sleep(0.05)


async def _delete_cards(runtime: DistributedRuntime, endpoint: Endpoint) -> None:
    from dynamix.llm import _cards_of  # late: llm imports this module

    for suffix in _cards_of(endpoint):
        await runtime._core.delete_card(endpoint.namespace, endpoint.component, endpoint.name,
                                        suffix)


# ---- calling -------------------------------------------------------------------------------------

class _Responses:
    """The async iterator a call returns (spec §5.2-§5.4)."""

    def __init__(self, stream: Any, annotated: bool, context: Optional[Context]) -> None:
        self._stream = stream
        self._annotated = annotated
        self._context = context
        self._done = False

    def __aiter__(self) -> "_Responses":
        return self

    async def __anext__(self) -> Any:
        if self._done or (self._context is not None and self._context.is_stopped()):
            # Stopped by the caller: what is still read ahead is dropped (spec §5.3).
            self._done = True
            raise StopAsyncIteration
        result = self._stream.try_next()
        if result == "pending":
            result = await self._stream.next()
        if result is None:
            self._done = True
            raise StopAsyncIteration
        kind, value = result
        if kind == "error":
            self._done = True
            raise _error_for(value["class"], value["message"], value.get("error_type"))
        if self._annotated:
            return Annotated._from_envelope(value)
        return value.get("data")

    async def aclose(self) -> None:
        if not self._done:
            self._done = True
            await self._stream.cancel(True)

    def cancel(self) -> None:
        """Stop the handler (the stream then ends)."""
        if self._context is not None:
            self._context.stop_generating()


class Client:
    """Calls every instance of one endpoint (spec §5)."""

    def __init__(self, endpoint: Endpoint, watch: Any, router_mode: Any) -> None:
        self._endpoint = endpoint
        self._watch = watch
        self._router_mode = router_mode
        self._next = 0

    def instance_ids(self) -> list:
        return list(self._watch.ids())

    async def wait_for_instances(self) -> list:
        return list(await self._watch.wait_for_instances())

    def _unavailable(self) -> ValueError:
        e = self._endpoint
        return _error_for("Unavailable",
                          f"no instances for endpoint {e.namespace}/{e.component}/{e.name}")

    async def round_robin(self, request: Any, annotated: bool = True,
                          context: Optional[Context] = None) -> _Responses:
        ids = self.instance_ids()
        if not ids:
            raise self._unavailable()
        instance = ids[self._next % len(ids)]
        self._next += 1
        return await self._call(instance, request, annotated, context)

    async def random(self, request: Any, annotated: bool = True,
                     context: Optional[Context] = None) -> _Responses:
        import random as _random

        ids = self.instance_ids()
        if not ids:
            raise self._unavailable()
        return await self._call(_random.choice(ids), request, annotated, context)

    async def direct(self, request: Any, instance_id: int, annotated: bool = True,
                     context: Optional[Context] = None) -> _Responses:
        return await self._call(instance_id, request, annotated, context)

    async def generate(self, request: Any, annotated: bool = True,
                       context: Optional[Context] = None) -> _Responses:
        mode = getattr(self._router_mode, "name", self._router_mode)
        if isinstance(mode, str) and mode.lower() == "random":
            return await self.random(request, annotated, context)
        return await self.round_robin(request, annotated, context)

    async def _call(self, instance_id: int, request: Any, annotated: bool,
                    context: Optional[Context]) -> _Responses:
        request_id = context.id() if context is not None else str(uuid.uuid4())
        control = context._control if context is not None else None
        headers = {}
        if context is not None:
            for key, value in context.metadata.items():
                headers[f"x-dynamo-meta-{key}"] = str(value)
        try:
            stream = await self._watch.call(instance_id, request, request_id, headers, control)
        except ValueError as e:
            text = str(e)
            klass, _, message = text.partition(": ")
            raise _error_for(klass if message else "Unavailable", message or text) from None
        return _Responses(stream, annotated, context)


# ---- decorators ----------------------------------------------------------------------------------

def dynamo_worker(enable_nats: Optional[bool] = None, static: bool = False) -> Callable:
    """``@dynamo_worker()`` on ``async def main(runtime, *args)`` (spec §2.2)."""
    if enable_nats is not None:
        warnings.warn("dynamo_worker(enable_nats=...) is deprecated and ignored",
                      DeprecationWarning, stacklevel=2)
    if static:
        raise ValueError(
            "static mode (static=True) is not supported: dynamix needs discovery; "
            "set DYN_DISCOVERY_BACKEND=mem for one process"
        )

    def decorator(main: Callable) -> Callable:
        @functools.wraps(main)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            loop = asyncio.get_running_loop()
            runtime = DistributedRuntime(
                loop,
                os.environ.get("DYN_DISCOVERY_BACKEND") or "etcd",
                os.environ.get("DYN_REQUEST_PLANE") or "tcp",
            )
            installed = []
            for sig in (signal.SIGINT, signal.SIGTERM):
                try:
                    loop.add_signal_handler(sig, runtime.shutdown)
                    installed.append(sig)
                except (NotImplementedError, RuntimeError, ValueError):
                    pass
            try:
                return await main(runtime, *args, **kwargs)
            finally:
                runtime.shutdown()
                # Let serve_endpoint calls that are still winding down finish.
                for _ in range(100):
                    if not runtime._serving:
                        break
                    await asyncio.sleep(0.05)
                await runtime._close()
                for sig in installed:
                    try:
                        loop.remove_signal_handler(sig)
                    except Exception:
                        pass

        return wrapper

    return decorator


def dynamo_endpoint(request_model: Any = None, response_model: Any = None) -> Callable:
    """Parse the request with a pydantic model when one is given (spec §4.5)."""

    def is_model(candidate: Any) -> bool:
        if not isinstance(candidate, type):
            return False
        try:
            from pydantic import BaseModel
        except ImportError:
            return False
        return issubclass(candidate, BaseModel)

    def parse(value: Any) -> Any:
        if not is_model(request_model):
            return value
        from pydantic import ValidationError

        try:
            if isinstance(value, (str, bytes)):
                return request_model.model_validate_json(value)
            if isinstance(value, dict):
                return request_model.model_validate(value)
        except ValidationError as e:
            raise ValueError(str(e)) from None
        return value

    def decorator(func: Callable) -> Callable:
        params = list(inspect.signature(func).parameters)
        bound_method = bool(params) and params[0] == "self"

        @functools.wraps(func)
        async def wrapper(*args: Any, **kwargs: Any) -> AsyncIterator:
            args = list(args)
            index = 1 if bound_method else 0
            if len(args) > index:
                args[index] = parse(args[index])
            async for item in func(*args, **kwargs):
                yield item

        return wrapper

    return decorator

