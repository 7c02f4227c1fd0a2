"""AsyncLLMEngine: one LLMEngine shared by many asyncio clients.

``LLMEngine.step()`` is blocking device work, so it runs in a dedicated thread. That thread is the
only one that touches the engine: clients send it commands (add, abort) through a thread-safe
queue, and it executes them between steps. Outputs go back to each request's asyncio queue with
``loop.call_soon_threadsafe``. Requests of all clients are batched together by the engine.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from jaxllm.engine.llm_engine import EngineStats, LLMEngine
from jaxllm.outputs import RequestOutput
from jaxllm.sampling_params import SamplingParams

logger = logging.getLogger("jaxllm")


class EngineQueueFullError(RuntimeError):
    """The bounded waiting queue is full; the server answers 503."""


_DEAD_CHECK_S = 0.5  # how often a request waiting to be taken checks that the engine thread lives


class EngineDeadError(RuntimeError):
    """The engine thread has stopped (shut down or crashed); no request can be served."""


class RequestStream:
    """The outputs of one request, filled by the engine thread and read by one asyncio task."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop):
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.finished = False

    def put(self, item: RequestOutput | BaseException) -> None:
        """Thread-safe: called from the engine thread."""
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.finished = True
                raise item
            self.finished = item.finished
            yield item


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | list[int] | dict  # a dict: vLLM's prompt dict (e.g. with a cache_salt)
    params: SamplingParams
    stream: RequestStream
    accepted: asyncio.Future  # resolved with None, or failed with the reason the request was refused
    priority: int = 0
    retain_blocks: bool = False  # keep its KV blocks when it finishes, for forks (beam search)
    lora_request: object = None  # a jaxllm.lora.LoRARequest: run it with that adapter


@dataclass(frozen=True)
class _Fork:
    parent_id: str  # a finished request that kept its blocks
    request_id: str
    token_ids: list[int]
    params: SamplingParams
    stream: RequestStream
    accepted: asyncio.Future


@dataclass(frozen=True)
class _Release:
    request_id: str


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    function: Callable[[LLMEngine], Any]  # run on the engine thread, between steps
    done: asyncio.Future  # its result, or its ValueError


class OutputObserver(Protocol):
    """Sees, on the engine thread, every output with the time it was produced (latency metrics)."""

    def observe(self, output: RequestOutput, now: float) -> None: ...

    def forget(self, request_id: str) -> None:
        """The request was aborted: it will produce no more outputs."""


class AsyncLLMEngine:
    """Serve an :class:`LLMEngine` to asyncio code.

    Args:
        engine: the engine; from now on only this object's thread may call it.
        max_waiting_requests: refuse new requests (``EngineQueueFullError``) while this many are
            already waiting to be scheduled; None: unbounded.
        observer: optional hook called on the engine thread for every output (metrics).
    """

    def __init__(self, engine: LLMEngine, max_waiting_requests: int | None = None,
                 observer: OutputObserver | None = None):
        if max_waiting_requests is not None and max_waiting_requests < 0:
            raise ValueError(f"{max_waiting_requests=} must be >= 0 or None")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.max_waiting_requests = max_waiting_requests
        self._observer = observer
        self._commands: queue.SimpleQueue[_Add | _Fork | _Abort | _Release] = queue.SimpleQueue()
        self._wakeup = threading.Event()
        self._stopping = threading.Event()
        self._streams: dict[str, RequestStream] = {}  # owned by the engine thread
        self._thread = threading.Thread(target=self._run, name="jaxllm-engine", daemon=True)
        self.stats: EngineStats = engine.stats  # replaced (never mutated) by the engine thread

    # -- client side (event loop) ------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def add_request(self, request_id: str, prompt: str | list[int] | dict,
                          params: SamplingParams, priority: int = 0, retain_blocks: bool = False,
                          lora_request=None) -> RequestStream:
        """Queue a request; returns its stream once the engine accepted it (``priority``,
        ``retain_blocks``, ``lora_request``: see :meth:`LLMEngine.add_request`; a request that retains its blocks
        must be released with :meth:`release` once done).

        Raises:
            ValueError: the engine refused the request (invalid parameters, prompt too long).
            EngineQueueFullError: the waiting queue is full.
            EngineDeadError: the engine thread is not running.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop)
        accepted = loop.create_future()
        return await self._queued(_Add(request_id, prompt, params, stream, accepted, priority, retain_blocks,
                                       lora_request))

    async def fork_request(self, parent_id: str, request_id: str, token_ids: list[int],
                           params: SamplingParams) -> RequestStream:
        """Queue ``token_ids``, which extend the finished, retained request ``parent_id``, sharing
        its KV blocks (see :meth:`LLMEngine.fork_request`); the new request retains its blocks too."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        stream = RequestStream(request_id, loop)
        return await self._queued(_Fork(parent_id, request_id, list(token_ids), params, stream, loop.create_future()))

    def release(self, request_id: str) -> None:
        """Free the blocks a finished request retained; runs on the engine thread."""
        self._send(_Release(request_id))

    async def _queued(self, command: _Add | _Fork) -> RequestStream:
        self._send(command)
        try:
            # A thread that dies after the check in add_request never answers: look again now and then.
            while not (await asyncio.wait({command.accepted}, timeout=_DEAD_CHECK_S))[0]:
                if not self._thread.is_alive():
                    command.accepted.cancel()
                    raise EngineDeadError("the engine stopped before it took the request")
            command.accepted.result()
        except asyncio.CancelledError:
            self.abort(command.request_id)  # the client left while the request was being queued
            raise
        return command.stream

    async def generate(self, request_id: str, prompt: str | list[int] | dict,
                       params: SamplingParams, priority: int = 0, lora_request=None) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs (as its params' ``output_kind`` asks); leaving early aborts it."""
        stream = await self.add_request(request_id, prompt, params, priority, lora_request=lora_request)
        try:
            async for output in stream:
                yield output
        finally:
            if not stream.finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Abort a request; it runs on the engine thread before its next step."""
        self._send(_Abort(request_id))

    async def call(self, function: Callable[[LLMEngine], Any]) -> Any:
        """``function(engine)`` run on the engine thread between steps (``sleep``, ``wake_up``,
        ``reset_prefix_cache``, ...); its ValueError is raised here."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        done = asyncio.get_running_loop().create_future()
        self._send(_Call(function, done))
        while not (await asyncio.wait({done}, timeout=_DEAD_CHECK_S))[0]:
            if not self._thread.is_alive():
                raise EngineDeadError("the engine stopped before it ran the call")
        return done.result()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread; requests still live end with EngineDeadError."""
        self._stopping.set()
        self._wakeup.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _send(self, command: _Add | _Fork | _Abort | _Release | _Call) -> None:
        self._commands.put(command)
        self._wakeup.set()

    # -- engine thread ---------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wakeup.clear()
                self._execute_commands()
                if self.engine.has_unfinished_requests():
                    self._step()
                else:
                    self.stats = self.engine.stats
                    self._wakeup.wait()
        except BaseException as exc:  # noqa: BLE001 - a dead engine must still end every stream
            logger.exception("engine thread crashed")
            self._fail_all(EngineDeadError(f"the engine stopped: {exc!r}"))
            raise
        self._execute_commands()
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _execute_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if isinstance(command, _Add | _Fork):
                self._add(command)
            elif isinstance(command, _Release):
                self.engine.release_request(command.request_id)
            elif isinstance(command, _Call):
                self._call(command)
            else:
                self._abort(command.request_id)

    def _add(self, command: _Add | _Fork) -> None:
        error = self._refusal(command)
        if error is None:
            self._streams[command.request_id] = command.stream
        loop = command.stream._loop
        loop.call_soon_threadsafe(_resolve, command.accepted, error)

    def _refusal(self, command: _Add | _Fork) -> BaseException | None:
        if self._stopping.is_set():
            return EngineDeadError("the server is shutting down")
        try:
            if isinstance(command, _Fork):  # a search under way continues, whatever the queue holds
                self.engine.fork_request(command.parent_id, command.request_id, command.token_ids, command.params)
                return None
            limit = self.max_waiting_requests
            if limit is not None and self.engine.stats.num_waiting >= limit:
                return EngineQueueFullError(f"the server is overloaded: {limit} requests are already waiting; "
                                            "retry later")
            self.engine.add_request(command.request_id, command.prompt, command.params, priority=command.priority,
                                    retain_blocks=command.retain_blocks, lora_request=command.lora_request)
        except ValueError as exc:
            return exc
        return None

    def _call(self, command: _Call) -> None:
        loop = command.done.get_loop()
        try:
            result = command.function(self.engine)
        except ValueError as exc:
            loop.call_soon_threadsafe(_settle, command.done, None, exc)
            return
        loop.call_soon_threadsafe(_settle, command.done, result, None)
        self.stats = self.engine.stats

    def _abort(self, request_id: str) -> None:
        if self._streams.pop(request_id, None) is not None:
            self.engine.abort_request(request_id)
            if self._observer is not None:
                self._observer.forget(request_id)

    def _step(self) -> None:
        outputs = self.engine.step()
        now = time.time()
        for output in outputs:
            if self._observer is not None:
                self._observer.observe(output, now)
            stream = self._streams.get(output.request_id)
            if stream is None:
                continue  # aborted while the step ran
            if output.finished:
                del self._streams[output.request_id]
            stream.put(output)
        self.stats = self.engine.stats

    def _fail_all(self, error: BaseException) -> None:
        for request_id, stream in list(self._streams.items()):
            self._abort(request_id)
            stream.put(error)
        self._streams.clear()
        self.stats = self.engine.stats


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if future.done():  # cancelled by a client that left
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _settle(future: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(result)
    else:
        future.set_exception(error)
