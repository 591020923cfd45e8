"""Sound in and out through PortAudio (sounddevice): the microphone and the speaker.

Capture runs in sounddevice's callback, which only copies into a bounded queue; overflows
(PortAudio's or ours) are counted, never silent. Playback takes :class:`Audio` of any rate,
resamples it (soxr) to the device's rate, and can be stopped at once (barge-in, Stop).
"""

from __future__ import annotations

import queue
import statistics
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from local.echo import FarEnd
from shared.audio import SPEECH_RATE, Audio
from shared.engine import name_os_thread
from shared.errors import AudioError

BLOCK_S = 0.032  # one Silero window per callback at 16 kHz
START_TIMEOUT_S = 10.0  # how long a just-opened input may take to deliver its first block


def _sd():
    try:
        import sounddevice as sd
    except OSError as exc:  # the PortAudio library itself is missing
        raise AudioError(f"PortAudio is not installed ({exc}): install libportaudio2 / `brew install portaudio`") from exc
    return sd


def _device(spec: str | int | None, kind: str) -> int | str | None:
    if spec in (None, "", "default"):
        return None
    if isinstance(spec, str) and spec.isdigit():
        return int(spec)
    return spec


@dataclass(frozen=True)
class DeviceInfo:
    index: int
    name: str
    inputs: int
    outputs: int
    default_rate: float
    is_default_input: bool
    is_default_output: bool


def list_devices() -> list[DeviceInfo]:
    sd = _sd()
    try:
        devices = sd.query_devices()
        d_in, d_out = sd.default.device
    except sd.PortAudioError as exc:
        raise AudioError(f"cannot list audio devices: {exc}") from exc
    return [
        DeviceInfo(i, d["name"], d["max_input_channels"], d["max_output_channels"], d["default_samplerate"],
                   i == d_in, i == d_out)
        for i, d in enumerate(devices)
    ]


def _open_rate(sd, device, kind: str) -> int:  # noqa: ANN001
    """16 kHz when the device takes it, else its own default rate (we resample)."""
    check = sd.check_input_settings if kind == "input" else sd.check_output_settings
    try:
        info = sd.query_devices(device, kind)
    except (ValueError, sd.PortAudioError) as exc:
        if device is None:
            raise AudioError(f"no default {kind} device: is one connected and allowed? (see `moi devices`)") from exc
        raise AudioError(f"no {kind} device {device!r}: {exc} (see `moi devices`)") from exc
    if kind == "input" and info["max_input_channels"] < 1 or kind == "output" and info["max_output_channels"] < 1:
        raise AudioError(f"device {info['name']!r} has no {kind} channels (see `moi devices`)")
    for rate in ((SPEECH_RATE,) if kind == "input" else ()) + (int(info["default_samplerate"]), 48_000, 44_100):
        try:
            check(device=device, channels=1, samplerate=rate, dtype="float32")
            return rate
        except (ValueError, sd.PortAudioError):
            continue
    raise AudioError(f"{kind} device {info['name']!r} accepts none of the rates tried (16/44.1/48 kHz)")


_EMPTY = np.zeros(0, np.float32)  # a player with nothing to play holds this


class StreamClock:
    """The monotonic time of each block of a stream, from the times its callbacks see.

    A stream is a run of samples at a fixed rate, so frame ``k`` is at ``anchor + k / rate``;
    only ``anchor`` has to be found, from callback times that jitter. The echo canceller needs
    both timelines steady to the sample (its filter is a fixed delay line), not jittering per
    block. An input callback can run late, never early, so the earliest-looking start of frame 0
    over the recent blocks is the right one (``late_only``). Recent, not all: a stream can lose
    frames without saying so (ALSA's PulseAudio plugin hides its overruns, e.g. while the models
    load at start-up), and from then on every block is later than the count of frames says; the
    earliest start over all blocks kept the time from before the loss (it crept towards later
    ones by 0.2 % a block: a second's loss took a minute to follow). An output stream's buffer
    is filled in bursts (on ALSA's PulseAudio plugin, blocks 0 and 40 ms apart instead of every
    20 ms), so its callbacks run early as well as late: there the anchor is the median of the
    recent ones.
    Either starts afresh when the stream broke (``restart``: frames lost, an underrun).
    """

    WINDOW = 64  # callbacks the anchor is taken over (~1.3 s of 20 ms blocks, 2 s of 32 ms ones)

    def __init__(self, rate: int, late_only: bool = True) -> None:
        self.rate = rate
        self.late_only = late_only
        self.anchor = 0.0  # monotonic time of frame 0
        self.frames = 0
        self._recent: deque[float] = deque(maxlen=self.WINDOW)

    def __call__(self, stamp: float, frames: int, restart: bool = False) -> float:
        """The time of this block's first frame; ``stamp``: that time as the callback saw it."""
        if restart:
            self._recent.clear()
        self._recent.append(stamp - self.frames / self.rate)
        # statistics.median, not np.median: ~1 us on 64 floats against ~10, twice a callback's
        # other work while nothing plays
        self.anchor = min(self._recent) if self.late_only else statistics.median(self._recent)
        t = self.anchor + self.frames / self.rate
        self.frames += frames
        return t


class MicSource:
    """The microphone as an iterator of 16 kHz :class:`Audio` chunks.

    ``overflows`` counts blocks lost (PortAudio reported an overflow, or our queue was full
    because the consumer fell behind). A device that stops delivering for ``stall_s`` raises
    :class:`AudioError` rather than hanging.
    """

    def __init__(
        self, device: str | int | None = None, *, max_queue_s: float = 5.0, stall_s: float = 2.0,
        max_s: float | None = None,
    ) -> None:
        self.sd = _sd()
        self.device = _device(device, "input")
        self.rate = _open_rate(self.sd, self.device, "input")
        self.block = int(self.rate * BLOCK_S)
        # a C queue: the callback runs ~31 times a second, all day
        self._q: queue.SimpleQueue[tuple[float, np.ndarray]] = queue.SimpleQueue()
        self._max_blocks = max(4, int(max_queue_s / BLOCK_S))
        self.overflows = 0
        self.stall_s = stall_s
        self._stream = None
        self._latency = 0.0  # PortAudio's input latency, fixed when the stream opens
        self._named = False
        self._closed = threading.Event()
        self._error: str | None = None
        self.max_s = max_s  # stop after this much audio (None: until closed)
        self.captured_at = 0.0  # monotonic time of the first sample of the chunk last yielded
        self._clock = StreamClock(self.rate)
        # > 0: with no block waiting, let blocks gather this long, then hand them over together
        # (fewer wake-ups while nothing happens: cloud.live sets it while idle)
        self.hold_s = 0.0

    def _callback(self, indata, frames, t, status) -> None:  # noqa: ANN001 - PortAudio signature
        if not self._named:  # PortAudio's thread for this stream
            self._named = True
            name_os_thread("moi-mic")
        if status.input_overflow:
            self.overflows += 1
        if self._q.qsize() >= self._max_blocks:
            self.overflows += 1
            return
        # the ADC time of the first frame: arrival less PortAudio's input latency (its own ADC
        # times jump by 100+ ms on ALSA's PulseAudio plugin; callback arrival is steady)
        stamp = time.monotonic() - self._latency - frames / self.rate
        self._q.put((self._clock(stamp, frames, status.input_overflow), indata[:, 0].copy()))

    def _finished(self) -> None:
        if not self._closed.is_set():
            self._error = "the input device stopped (unplugged?)"

    def start(self) -> MicSource:
        try:
            self._stream = self.sd.InputStream(
                device=self.device, channels=1, samplerate=self.rate, blocksize=self.block, dtype="float32",
                callback=self._callback, finished_callback=self._finished,
            )
            self._latency = self._stream.latency
            self._stream.start()
        except self.sd.PortAudioError as exc:
            raise AudioError(f"cannot open the microphone: {exc}") from exc
        return self

    def close(self) -> None:
        self._closed.set()
        if self._stream is not None:
            try:
                self._stream.abort()
                self._stream.close()
            except self.sd.PortAudioError:
                pass  # already gone with its device
            self._stream = None

    def __iter__(self) -> Iterator[Audio]:
        if self._stream is None:
            self.start()
        resampler = None
        if self.rate != SPEECH_RATE:
            import soxr

            resampler = soxr.ResampleStream(self.rate, SPEECH_RATE, 1, dtype="float32")
        delivered = 0.0
        pending = None  # a block taken while gathering that did not follow on: the next chunk's
        while not self._closed.is_set() and (self.max_s is None or delivered < self.max_s):
            # A sound server can take seconds to start a stream; after that, a gap is a stall.
            wait = self.stall_s if delivered else max(self.stall_s, START_TIMEOUT_S)
            held = self.hold_s > 0
            if pending is None and held and self._q.empty() and self._closed.wait(self.hold_s):
                return
            try:
                adc, block = pending if pending is not None else self._q.get(timeout=wait)
            except queue.Empty:
                if self._closed.is_set():
                    return
                raise AudioError(self._error or f"the microphone delivered nothing for {wait:.0f} s (unplugged?)")
            pending = None
            if held:  # what gathered goes on as one chunk: one pass of every stage for all of it
                blocks, end = [block], adc + len(block) / self.rate
                while not self._q.empty():
                    nxt = self._q.get_nowait()
                    # the clock jumped (frames lost: an overflow): the echo reference is cut from a
                    # chunk's first time, so a chunk must be one run of samples
                    if abs(nxt[0] - end) > 0.5 / self.rate * len(nxt[1]):
                        pending = nxt
                        break
                    blocks.append(nxt[1])
                    end += len(nxt[1]) / self.rate
                block = np.concatenate(blocks) if len(blocks) > 1 else block
            delivered += len(block) / self.rate
            if resampler is not None:
                block = resampler.resample_chunk(block)
            self.captured_at = adc
            yield Audio(block, SPEECH_RATE)


class Player:
    """Plays :class:`Audio` on an output device; ``stop`` silences it at once, ``pause`` too,
    keeping the rest for ``resume``.

    Audio is resampled to the device rate on the way in; the PortAudio callback only copies
    from a buffer. ``stopped_at`` is the monotonic time the last ``stop`` took effect. ``far``
    receives every block sent to the speaker, silence included, with the time it reaches the
    DAC: the echo canceller's reference.
    """

    pausable = True

    def __init__(self, device: str | int | None = None) -> None:
        self.sd = _sd()
        self.device = _device(device, "output")
        self.rate = _open_rate(self.sd, self.device, "output")
        self._lock = threading.Lock()
        self._buf = _EMPTY
        self._pos = 0
        self.played_s = 0.0
        self.stopped_at: float | None = None
        self._idle = threading.Event()
        self._idle.set()
        self.far = FarEnd(self.rate)
        self._clock = StreamClock(self.rate, late_only=False)
        self._restarted = False  # stop() restarted the stream: its timeline starts afresh
        self._paused = False  # pause(): silent, the rest kept for resume()
        self._named = False
        self._stream = self.sd.OutputStream(
            device=self.device, channels=1, samplerate=self.rate, dtype="float32",
            blocksize=int(self.rate * 0.02), latency="low", callback=self._callback,
        )
        self._latency = self._stream.latency  # PortAudio's, fixed when the stream opens
        self._stream.start()

    def _callback(self, outdata, frames, t, status) -> None:  # noqa: ANN001 - PortAudio signature
        # runs every 20 ms, silence included: kept to the least work while nothing plays
        if not self._named:  # PortAudio's thread for this stream
            self._named = True
            name_os_thread("moi-speaker")
        out, n = outdata[:, 0], 0
        with self._lock:
            if not self._paused and self._pos < len(self._buf):
                n = min(frames, len(self._buf) - self._pos)
                out[:n] = self._buf[self._pos : self._pos + n]
                self._pos += n
                if self._pos >= len(self._buf):
                    self._buf, self._pos = _EMPTY, 0
                    self._idle.set()
        if n < frames:
            out[n:] = 0.0
        self.played_s += n / self.rate
        # PortAudio's own DAC time for the block cannot be trusted: on ALSA's PulseAudio plugin
        # over a combine sink it said 1.35 s ahead for half a minute, then more than 2 s, while
        # the sound came out 0.25 s after it was written (measured). The stream's latency is
        # steady; what it leaves out, EchoPath finds from the signals.
        # every block goes out, silence included, so the speaker's timeline is one run of
        # samples, broken only by an underrun
        restart, self._restarted = self._restarted or status.output_underflow, False
        dac = self._clock(time.monotonic() + self._latency, frames, restart)
        self.far.write(dac, out)

    @property
    def playing(self) -> bool:
        """Whether it holds sound to play (paused or not)."""
        return not self._idle.is_set()

    @property
    def paused(self) -> bool:
        return self._paused

    def play(self, audio: Audio) -> None:
        samples = audio.resample(self.rate).samples
        with self._lock:
            self._buf = np.concatenate([self._buf[self._pos :], samples])
            self._pos = 0
            if len(self._buf):
                self._idle.clear()

    def stop(self) -> float:
        """Silence it now; returns the seconds of what it was given that nobody heard: what it
        still held, and PortAudio's latency of what it had handed on (which the restart drops;
        a paused speaker's rest already holds that)."""
        with self._lock:
            left, paused = len(self._buf) - self._pos, self._paused
            self._buf, self._pos, self._paused = _EMPTY, 0, False
            self._idle.set()
        if left <= 0:
            return 0.0
        now = time.monotonic()
        self._silence_now()
        self.stopped_at = now
        return left / self.rate + (0.0 if paused else self._latency)

    def pause(self) -> None:
        """Silence the speaker now, keeping the rest of what it was given for ``resume``: from
        PortAudio's latency back, what the sound server held unheard (it holds more on some
        sinks: that much is lost). The stream restarts, as on ``stop``: on ALSA's PulseAudio
        plugin a restarted stream starts deep (the virtual card's null sink: 1.7 s, draining in
        real time), so a resume soon after is heard that much later. With nothing left to play
        (the reply's next piece is still being made) it holds back what comes until ``resume``."""
        with self._lock:
            if self._paused:
                return
            self._paused = True
            if len(self._buf) <= self._pos:
                return
            self._pos = max(0, self._pos - int(self._latency * self.rate))
        self._silence_now()

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def _silence_now(self) -> None:
        # what the sound server holds for the stream still plays out, for its whole depth
        # (a PulseAudio null sink: 50 ms; through a combine sink 0.2-0.3 s; none of it in
        # PortAudio's latency): a restart drops it and the speaker goes silent now
        # (bench/live.py, on the recording: 485 -> 195 ms). An echo canceller following the
        # speaker finds the new run's latency again; the echo it lets slip meanwhile is not
        # taken for a person (TalkOver.person asks EchoPath.unexplained)
        try:
            self._stream.abort()
            self._restarted, self._named = True, False  # a new run, on a new PortAudio thread
            self._stream.start()
        except self.sd.PortAudioError:  # gone: the next play() or close() says so
            pass

    def wait(self, timeout: float | None = None) -> bool:
        return self._idle.wait(timeout)

    def close(self) -> None:
        self.stop()
        try:
            self._stream.abort()
            self._stream.close()
        except self.sd.PortAudioError:
            pass
