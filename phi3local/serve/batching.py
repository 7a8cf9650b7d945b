"""The worker's decode loop: one thread runs every request's generation, a token of each in turn.

azmlinfsrv runs requests on gunicorn threads in one worker process (`--threads`). By default each thread runs
its own onnxruntime-genai Generator: N requests are N interleaved onnxruntime runs, in an order the GIL and the
OS pick. With the loop (opt-in: `PHI3LOCAL_MAX_BATCH=N`), a request thread hands its prompt to the loop and
waits on its own queue of tokens, and the loop:
- admits waiting requests at the start of each round (first come, first served), up to `max_active` at once;
  the others wait;
- advances every active request by one token per round (iteration-level scheduling, as continuous batching
  engines do: a request joins at the next round and leaves as soon as it ends, nobody waits for a batch);
- gives each request its own sequence (chat.Decode: its own Generator and KV cache, its own max_tokens,
  temperature, top_p and seed, its own LongRoPE re-prefill), so a request's tokens are those it gets alone,
  greedy or seeded, whatever else runs (tests/test_serve_batching.py checks it token for token);
- lets a sequence run at most READ_AHEAD tokens ahead of its reader (a slow stream waits, it does not
  compute its whole answer), frees it at the next round when its reader is gone (a stop sequence, a client
  that disconnected), and delivers a failure to the request it belongs to only.

Why not one batched forward for the active requests: onnxruntime-genai 0.18 offers continuous batching
(`og.Engine` with `engine.dynamic_batching`) only for PagedAttention exports, which its builder makes for CUDA
and WebGPU only; for the CPU exports here it has a static Engine (requests grouped into fixed batches of 4, no
join while one runs, rewinds only alone) and `og.Generator` with batch_size > 1 (all rows start together).
Measured on this 2-core CPU with the benchmark's int4 model: a Generator step of 8 rows cost about 8 steps of
one (0.35 vs 0.37 ms per sequence single-threaded; the int4 lm_head takes 193 us for 1 row, 1410 us for 8;
under heavier load 0.49 vs 0.84 ms, the saving being mostly onnxruntime's thread synchronisation), a padded
batch of 8 prompts took 0.97-1.16x the time of the 8 alone, and left padding changed the greedy tokens of the
padded rows (equal-length prompts only would batch identically), so the loop runs each sequence's own step. And
onnxruntime-genai 0.18's Generator calls hold the GIL, so the loop's thread and the request threads take turns:
each token crosses from the loop's thread to its request's, which on that (shared) machine cost more than the
loop saved, hence opt-in. The measurements: docs/serving.md ("Concurrent requests").
"""

from __future__ import annotations

import os
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator

import numpy as np

from phi3local.serve.chat import Decode, OnnxChatModel

END = object()  # put on a sink when its sequence ended normally
# Tokens a sequence may run ahead of its reader: a slow or stalled stream waits there instead of computing its
# whole answer, and an abandoned one has wasted at most this many.
READ_AHEAD = 16
IDLE_WAIT_S = 0.005  # every active sequence is ahead of its reader: look again after this long


class Sequence:
    """A request's decode as the loop sees it: its steps, where its tokens go, and whether its reader left.

    `put` receives each token id, then END or the exception that ended it; `behind` says how many tokens the
    reader has not read yet."""

    def __init__(self, decode: Decode, put: Callable[[object], None], behind: Callable[[], int]):
        self.decode, self.put, self.behind = decode, put, behind
        self.cancelled = False  # the reader is gone: free the sequence at the next round


class DecodeLoop:
    """Runs many requests' decodes on one thread, one token of each per round (see the module docstring).

    on_round, if given, is called after every round that advanced a sequence."""

    def __init__(self, model: OnnxChatModel, max_active: int = 8, on_round: Callable[[], None] | None = None):
        if max_active < 1:
            raise ValueError(f"max_active must be >= 1, got {max_active}")
        self.model = model
        self.max_active = max_active
        self.on_round = on_round
        self._cv = threading.Condition()
        self._waiting: deque[Sequence] = deque()
        self._thread: threading.Thread | None = None
        self._pid: int | None = None
        self.rounds = 0  # rounds that advanced a sequence (for tests and monitoring)
        self.peak_active = 0  # the most sequences advanced in one round

    def tokens(self, ids: np.ndarray, max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
               seed: int | None = None) -> Iterator[tuple[int, str]]:
        """(token id, text piece) of each generated token, as OnnxChatModel.iter_tokens gives them: the tokens
        come from this loop's thread, the text is decoded in the caller's. Closing the iterator early frees the
        sequence at the loop's next round."""
        out: queue.SimpleQueue = queue.SimpleQueue()
        sequence = Sequence(Decode(self.model, ids, max_new_tokens, temperature, top_p, seed=seed), out.put,
                            out.qsize)
        self.submit(sequence)
        try:
            yield from self.model.pieces(received(out.get), ids)
        finally:
            sequence.cancelled = True

    def submit(self, sequence: Sequence) -> None:
        with self._cv:
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                # Started on first use, in the process that uses it (a forked process does not inherit threads).
                self._pid = os.getpid()
                self._thread = threading.Thread(target=self._run, name="phi3local-decode-loop", daemon=True)
                self._thread.start()
            self._waiting.append(sequence)
            self._cv.notify()

    def _run(self) -> None:
        active: list[Sequence] = []
        while True:
            with self._cv:
                while not self._waiting and not active:
                    self._cv.wait()
                while self._waiting and len(active) < self.max_active:
                    active.append(self._waiting.popleft())
            advanced = 0
            try:
                for sequence in list(active):
                    left, stepped = self._advance(sequence)
                    advanced += stepped
                    if left:
                        active.remove(sequence)
                if advanced and self.on_round is not None:
                    self.on_round()
            except Exception as e:  # a fault of the loop itself: fail its requests rather than leave them waiting
                for sequence in active:
                    sequence.decode.close()
                    sequence.put(e)
                active.clear()
                continue
            if advanced:
                self.rounds += 1
                self.peak_active = max(self.peak_active, advanced)
            elif active:
                with self._cv:
                    if not self._waiting:
                        self._cv.wait(IDLE_WAIT_S)

    @staticmethod
    def _advance(sequence: Sequence) -> tuple[bool, bool]:
        """One token of one sequence: (whether it has left the loop (ended, failed or abandoned), whether it
        stepped). A sequence READ_AHEAD tokens ahead of its reader waits for this round."""
        decode = sequence.decode
        if sequence.cancelled:
            decode.close()
            return True, False
        if sequence.behind() >= READ_AHEAD:
            return False, False
        try:
            token = decode.step()
        except Exception as e:  # this request's failure only (its reader raises it): the others go on
            decode.close()
            sequence.put(e)
            return True, True
        sequence.put(token)
        if decode.done:
            decode.close()
            sequence.put(END)
            return True, True
        return False, True


def received(get: Callable[[], object]) -> Iterator:
    """The items of a sequence's sink up to END; an exception put there is raised."""
    while True:
        item = get()
        if item is END:
            return
        if isinstance(item, BaseException):
            raise item
        yield item
