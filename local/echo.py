"""Acoustic echo cancellation: the microphone without moi's own voice.

A laptop's microphone hears its speaker. :class:`FarEnd` keeps what the player handed to the
speaker, stamped with the time PortAudio says each block reaches the DAC; :class:`EchoCanceller`
takes each microphone chunk with the time its first sample left the ADC, cuts the reference
for the same span of time, and lets a canceller remove it, 10 ms at a time. What is left is
the person, so speech over a reply can stop it (``--barge-in auto``) while moi's voice never
starts a turn.

Cancellers, measured against each other on the same recordings in ``bench/echo.py``:
``pywebrtc`` (WebRTC's AEC3 through the pywebrtc-audio bindings, the default: 54 dB of echo
removed against 33), ``livekit`` (AEC3 through LiveKit's SDK) and ``speex`` (SpeexDSP's MDF
filter over the system libspeexdsp: 14 dB, not enough).

Why one long module (~650 lines): the canceller, its linear filter, the echo path estimate and
TalkOver read the same signals at the same moments, and their tuning constants interlock.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from collections.abc import Callable
from pathlib import Path

import numpy as np

from shared.audio import SPEECH_RATE, Audio
from shared.errors import ConfigError

FRAME = SPEECH_RATE // 100  # cancellers take 10 ms frames
KEEP_S = 3.0  # reference kept behind the microphone: the longest echo path we can follow
# The reference is cut this much later than the microphone's time says, so that an input
# latency PortAudio under-reports cannot put the echo ahead of its reference (no canceller
# can remove an echo before its cause); AEC3 finds the delay left itself, within REACH.
LEAD_S = 0.1
# Where the timestamps put the reference is only as good as the latencies the audio stack
# reports: on the virtual card's combine sink PortAudio's DAC times ran 0.6 s late for the
# first 40 s of a session (measured), where no canceller can follow. So the echo's delay is
# also found from the signals (EchoPath), and when the echo does not trail the reference by
# a delay in REACH (the canceller then follows it: measured live, 50-220 ms), the reference is
# moved so that it trails by TRAIL_S. Not otherwise: each move costs the canceller its filter.
TRAIL_S, REACH = 0.05, (0.005, 0.2)
SLIP_S = 0.02  # how far the two clocks may drift apart before the reference is cut afresh
# The speaker's blocks follow each other sample for sample; only when their DAC times have moved
# this far from that count is the stream taken to have jumped (an underrun, a restart). Smaller
# moves are the jitter of the callbacks: following them cut and padded the reference 30 times a
# second while moi spoke and the CPU was busy (measured live), and the canceller removed nothing.
GAP_S = 0.05
# Trusted once it has removed this much of moi's voice over this much of it: a canceller that
# has not converged yet (the first second or two of the first reply) lets echo through.
TRUST_DB, TRUST_S = 15.0, 1.0
FAR_ACTIVE = 1e-3 ** 2  # reference power above -60 dBFS: the speaker is playing something
# Speech while the speaker plays counts as the person's only where the canceller let at least
# NEAR_DB of the microphone's energy through, chunk by chunk, for PERSON_S of the last NEAR_S:
# echo it has learnt comes out 30-50 dB down, a person talking over it 0-15 dB. (PERSON_S was
# 0.15 s, to outlast the 30-100 ms bursts of echo the canceller lets slip; PERSON_SHARE tells
# those apart now, and each 0.1 s of it was 0.1 s more of moi talking over the person.)
NEAR_DB, NEAR_S, PERSON_S = -20.0, 0.3, 0.06
# ...and only where PERSON_SHARE of the microphone's sound over those NEAR_S is not moi's voice
# (EchoPath.unexplained): the canceller's account fails when it does (AEC3 let a steady echo
# through whole for 0.3 s, three times a run, measured live: 0.02-0.16 of it unexplained there,
# a person talking over moi 0.75-1; moi alone through a simulated room stays under 0.46)
PERSON_SHARE = 0.4
QUIET = 1e-3 ** 2  # a microphone chunk below -60 dBFS holds nobody
# ...and GUARDED_SHARE where the canceller is least sure: in the first ONSET_S of moi's voice
# after a pause of PAUSE_S (before it has caught the new sound; on the bench's card the echo's
# delay also moves by up to 55 ms as a reply starts, and AEC3 loses its filter: live, a cut
# 0.7 s into a reply and one 1.3 s in, both at 0.43 unexplained), and in the TAIL_S after moi's
# voice stops (the echo of its last words still arrives while the reference is silent; measured
# live: moi's echo 0.01-0.07 unexplained there, a person 0.56-0.87). Both windows used to refuse
# everyone, and a person who spoke up as a piece ended was heard 0.2-0.3 s later for it. Six
# live runs replayed (bench/echo_replay.py, 60 sentences said about 1 s into a reply): ONSET_S
# 1.0 and 0.6 stopped for moi's voice once (the cut 1.3 s in), median decision 0.144 s; 1.5 and
# 0.45 never, 0.176 s; 1.5 and 0.5 never, 0.223 s; 1.5 and 0.6, 0.286 s.
ONSET_S, PAUSE_S, TAIL_S = 1.5, 0.5, 0.3
GUARDED_SHARE = 0.45
# Someone is plain in that share long before AEC3 lets them through: while both talk, its
# suppressor held a person down for 0.3 s (live, echo 6 dB down: its output at -70..-94 dBFS,
# Silero under 0.39 on it) while 55-77 % of the microphone's sound was unexplained within 50 ms.
# moi's voice alone, two chunks in a row, stayed at or under 0.51 in five live runs (17,000
# chunks, replayed). At SURE_SHARE two chunks in a row, SURE_DB over the microphone's quietest
# of the last FLOOR_S (a muted speaker leaves only the room, all of it unexplained), someone is
# there; no VAD has asked whether it is speech, so cloud.live pauses the reply, not stops it.
# Only once moi's voice has played for NEAR_S and the echo's longest delay (REACH) since it
# began after a pause of PAUSE_S: as it starts, the room's noise before it is most of what the
# microphone heard, and none of that is moi's (in a room at -50 dBFS, 77-89 % unexplained as
# moi's first word came in). Its shorter pauses do not start that wait again: Piper pauses
# 0.16-0.29 s at commas (Kokoro 30-60 ms between words), and a wait after each (it was, after
# any break of 0.1 s) heard a person talking over Piper 0.25-1.4 s late in 13 of 18 simulated
# rooms, now in a median of 0.18 s, as over Kokoro (0.17), with no false alarm over either voice
# (the slowest, 0.3-0.66 s, where the person spoke up as the reply's last words ended).
SURE_SHARE, SURE_DB, FLOOR_S = 0.6, 10.0, 3.0
# The speaker silent this long, and its reference silent in the chunk: the canceller is not run
# (AEC3's filter spans well under a second of echo), the microphone goes through as it is.
IDLE_S = 2.0

Backend = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (near, far) int16[FRAME] -> int16[FRAME]


class FarEnd:
    """What the speaker played, block by block, with the monotonic time each block's first
    sample reaches the DAC. The player's callback writes; the capture thread reads."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self._lock = threading.Lock()
        self._blocks: deque[tuple[float, np.ndarray]] = deque(maxlen=int(KEEP_S * rate / 64) + 16)

    def write(self, dac_time: float, samples: np.ndarray) -> None:
        with self._lock:
            self._blocks.append((dac_time, samples.copy()))

    def take(self) -> list[tuple[float, np.ndarray]]:
        with self._lock:
            blocks = list(self._blocks)
            self._blocks.clear()
        return blocks


def _let_through(mic_e: float, out_e: float) -> bool:
    """Whether the canceller let a chunk's microphone energy through (NEAR_DB): a person, or
    echo it did not remove."""
    return out_e >= mic_e * 10 ** (NEAR_DB / 10)


def _to_int16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32768.0), -32768, 32767).astype(np.int16)


def _livekit() -> Backend:
    from livekit import rtc

    apm = rtc.AudioProcessingModule(echo_cancellation=True, high_pass_filter=True)
    apm.set_stream_delay_ms(0)  # the reference is already cut at the microphone's time

    def process(near: np.ndarray, far: np.ndarray) -> np.ndarray:
        apm.process_reverse_stream(rtc.AudioFrame(far.tobytes(), SPEECH_RATE, 1, FRAME))
        frame = rtc.AudioFrame(near.tobytes(), SPEECH_RATE, 1, FRAME)
        apm.process_stream(frame)
        return np.frombuffer(frame.data, np.int16)

    return process


def _pywebrtc() -> Backend:
    from pywebrtc_audio import AudioProcessor

    apm = AudioProcessor(SPEECH_RATE, 1, echo_cancellation=True, high_pass_filter=True)
    return lambda near, far: apm.process(near, far)


def _speex() -> Backend:
    try:
        from speexdsp_aec import SpeexAec

        aec = SpeexAec(SPEECH_RATE, frame_ms=10, filter_tail_ms=200)
    except RuntimeError as exc:  # the package is there, the C library is not
        raise ImportError(str(exc)) from exc
    return lambda near, far: np.frombuffer(aec.process(near, far), np.int16)


BACKENDS: dict[str, Callable[[], Backend]] = {"pywebrtc": _pywebrtc, "livekit": _livekit, "speex": _speex}
INSTALL = {"livekit": "pip install livekit", "pywebrtc": "pip install pywebrtc-audio",
           "speex": "pip install speexdsp-aec (and libspeexdsp: apt install libspeexdsp1 / brew install speexdsp)"}


def backend(name: str) -> Backend:
    """A fresh canceller: ``name`` is one of BACKENDS. ImportError when it is not installed."""
    if name not in BACKENDS:
        raise ConfigError(f"unknown echo canceller {name!r}: choose one of {', '.join(BACKENDS)}, auto or off")
    return BACKENDS[name]()


class EchoPath:
    """What the microphone hears of the reference, from the two signals themselves (the last
    ``WINDOW_S`` of both, in rings the capture thread writes every chunk).

    ``update`` says how far the echo trails the reference (GCC-PHAT at 4 kHz, lags within
    ``±REACH_S``, once every ``EVERY_S`` while the speaker plays), only when two estimates in a
    row agree and the correlation peak is clear (``MIN_PEAK``: unrelated signals peak at ~0.02,
    moi's echo through a room at 0.1-0.15, through a loopback near 1), so a person talking over
    moi, or a quiet stretch, cannot move the reference.

    ``unexplained`` says how much of the recent microphone is *not* moi's voice: the canceller's
    own account cannot be trusted when it fails (AEC3 let moi's echo through whole for 0.3 s at
    a time on a steady, perfectly linear echo path, measured live), so near_end asks this too.
    """

    WINDOW_S, REACH_S, EVERY_S, MIN_PEAK, AGREE_S = 4.0, 1.5, 0.5, 0.06, 0.01
    DOWN = 4  # 16 kHz -> 4 kHz: plenty to place the reference for a canceller that finds the rest
    # unexplained(): the echo is looked for this far around the reference (it trails by 5-200 ms
    # once placed, and a stream's jump moves it by tens of ms), then the microphone is split,
    # frequency by frequency, into what a linear filter of the reference explains (the
    # magnitude-squared coherence, Welch over SEGMENT samples) and the rest, in BAND
    LAGS_S, SEGMENT, BAND = (-0.05, 0.45), 1024, (150.0, 4000.0)

    def __init__(self) -> None:
        self._n = int(self.WINDOW_S * SPEECH_RATE)
        self._mic = np.zeros(self._n, np.float32)
        self._ref = np.zeros(self._n, np.float32)
        self._at = 0  # where the next sample goes in both
        self._since = 0  # samples since the last estimate
        self._filled = 0  # samples held since the last reset
        self._last: float | None = None
        self._quiet = 0  # samples since a chunk in which the speaker played
        self.lag: float | None = None  # the latest clear estimate (s), kept through silences

    def reset(self) -> None:
        """The reference moved: what is held no longer matches it."""
        self._filled, self._last, self.lag = 0, None, None

    def update(self, mic: np.ndarray, ref: np.ndarray, active: bool) -> float | None:
        """Another chunk of both; ``active``: the speaker played in it (FAR_ACTIVE)."""
        n = min(len(mic), self._n)
        where = (self._at + np.arange(n)) % self._n
        self._mic[where], self._ref[where] = mic[len(mic) - n :], ref[len(ref) - n :]
        self._at = (self._at + n) % self._n
        self._since += n
        self._filled = min(self._filled + n, self._n)
        self._quiet = 0 if active else self._quiet + n
        if self._since < self.EVERY_S * SPEECH_RATE or self._filled < self._n:
            return None
        self._since = 0
        # no chunk of the window had the speaker playing: the estimate would find nothing (its
        # power, averaged down to 4 kHz, is no more than the chunks'), so it is not made
        lag = self._estimate() if self._quiet < self._n else None
        agreed = lag is not None and self._last is not None and abs(lag - self._last) <= self.AGREE_S
        self._last = lag
        self.lag = lag if lag is not None else self.lag
        return lag if agreed else None

    def _recent(self, ring: np.ndarray, n: int) -> np.ndarray:
        """The last ``n`` samples written to ``ring``, oldest first."""
        return ring[(self._at - n + np.arange(n)) % self._n]

    def _estimate(self) -> float | None:
        k = self.DOWN
        mic = self._recent(self._mic, self._n).reshape(-1, k).mean(axis=1)
        ref = self._recent(self._ref, self._n).reshape(-1, k).mean(axis=1)
        if np.mean(ref**2) < FAR_ACTIVE or np.mean(mic**2) < FAR_ACTIVE * 1e-2:
            return None
        size = 1 << int(np.ceil(np.log2(2 * len(mic))))
        spec = np.fft.rfft(mic, size) * np.conj(np.fft.rfft(ref, size))
        cc = np.fft.irfft(spec / (np.abs(spec) + 1e-12), size)
        reach = int(self.REACH_S * SPEECH_RATE / k)
        lags = np.concatenate([np.arange(0, reach + 1), np.arange(-reach, 0)])
        peaks = np.concatenate([cc[: reach + 1], cc[-reach:]])
        best = int(np.argmax(peaks))
        return float(lags[best]) * k / SPEECH_RATE if peaks[best] >= self.MIN_PEAK else None

    def unexplained(self, seconds: float) -> float:
        """The share (0-1) of the microphone's power over the last ``seconds`` that no linear
        filter of the reference, at any lag in LAGS_S, explains: ~0 for moi's echo alone,
        whatever the canceller made of it, the person's share of the sound when someone talks
        over it. Per frequency, 1 - the magnitude-squared coherence of the two (Welch, SEGMENT
        samples a quarter apart), weighted by the microphone's power; the lag that explains
        the most wins, on a grid of SEGMENT / 8."""
        seg, n = self.SEGMENT, int(seconds * SPEECH_RATE)
        hop, step = seg // 4, seg // 8
        lo, hi = (int(round(x * SPEECH_RATE / step)) * step for x in self.LAGS_S)
        mic = self._recent(self._mic, n)
        ref = self._recent(self._ref, n + hi)  # ref[j : j + n] lies (hi - j) samples behind mic
        if lo < 0:  # the reference's future is not there yet: those lags are cut short
            ref = np.concatenate([ref, np.zeros(-lo, np.float32)])
        window = np.hanning(seg)
        band = slice(int(self.BAND[0] * seg / SPEECH_RATE), int(self.BAND[1] * seg / SPEECH_RATE))

        def spectra(x: np.ndarray, every: int) -> np.ndarray:
            frames = np.lib.stride_tricks.sliding_window_view(x, seg)[::every]
            return np.fft.rfft(frames * window, axis=1)[:, band]

        a, b = spectra(mic, hop), np.conj(spectra(ref, step))  # b: a frame at every lag step
        power, lags, k = np.abs(b) ** 2, (hi - lo) // step + 1, hop // step
        cross, pb = np.zeros((lags, a.shape[1]), np.complex128), np.zeros((lags, a.shape[1]))
        for m in range(len(a)):  # microphone frame m against the reference's at every lag at once
            cross += a[m] * b[k * m : k * m + lags]
            pb += power[k * m : k * m + lags]
        pa = np.sum(np.abs(a) ** 2, axis=0)
        coherence = np.abs(cross) ** 2 / (pa * pb + 1e-20)
        return float(np.min(np.sum((1.0 - coherence) * pa, axis=1)) / (np.sum(pa) + 1e-20))


class LinearEcho:
    """moi's voice taken out of the microphone by a linear filter alone, for what Whisper hears
    of an utterance (``EchoCanceller.linear``; the VAD still listens to the canceller's output).

    While both talk, AEC3's nonlinear stage holds the person down for their first 0.1-0.4 s,
    and Whisper loses their first words; a linear filter does not: offline, on one live run's
    recorded signals, the ten sentences said over moi came out at WER 0.085 this way against
    0.209 from AEC3's output (0.09 for the clips alone). Per frequency (STFT, N samples, a
    quarter apart) the reference's transfer to the microphone, H = Sxy / Syy with the
    reference taken ``lag`` earlier, is learnt while moi talks alone and subtracted always.
    """

    N, HOP = 2048, 512
    FORGET = 0.94  # per hop (32 ms): about half a second of memory
    # trusted LEARN_S after the echo's lag is first known (a session's first 4 s of moi's voice,
    # or a move of the reference, when what it learnt is for another place); later changes of
    # the lag (a stop's restart, an underrun) it follows within half a second, FORGET
    LEARN_S = 1.0
    KEEP_S = 30.0  # the cleaned microphone kept: the longest utterance looked up

    def __init__(self) -> None:
        self._window = np.hanning(self.N + 1)[: self.N].astype(np.float32)
        history = np.zeros(self.N - self.HOP, np.float32)
        self._mic, self._ref = history, history.copy()  # input not yet framed, N - HOP behind
        self._far = np.zeros(0, np.float32)  # the reference's recent past, for the lag
        self._sxy = np.zeros(self.N // 2 + 1, np.complex128)
        self._syy = np.zeros(self.N // 2 + 1)
        self._ola = np.zeros(self.N, np.float32)
        self._out = np.zeros(int(self.KEEP_S * SPEECH_RATE), np.float32)  # a ring by input sample
        self.done = -(self.N - self.HOP)  # input sample index of the next sample out

    def feed(self, mic: np.ndarray, far: np.ndarray, lag_s: float, learn: bool) -> None:
        """Another chunk of microphone and reference (as the canceller got them); ``learn``:
        moi talks alone in it, so the filter may follow the echo path."""
        lag = int(round(lag_s * SPEECH_RATE))
        self._far = np.concatenate([self._far, far])[-(lag + len(far) + 1) :]
        late = self._far[len(self._far) - lag - len(far) : len(self._far) - lag]
        late = np.concatenate([np.zeros(len(far) - len(late), np.float32), late])
        self._mic, self._ref = np.concatenate([self._mic, mic]), np.concatenate([self._ref, late])
        while len(self._mic) >= self.N:
            if not self._ref[: self.N].any():  # nothing of moi in the frame: H y = 0, what is left is the frame
                if learn:
                    self._sxy, self._syy = self.FORGET * self._sxy, self.FORGET * self._syy
                self._ola += self._window * self._window * self._mic[: self.N]
            else:
                x = np.fft.rfft(self._window * self._mic[: self.N])
                y = np.fft.rfft(self._window * self._ref[: self.N])
                if learn:
                    self._sxy = self.FORGET * self._sxy + x * np.conj(y)
                    self._syy = self.FORGET * self._syy + np.abs(y) ** 2
                h = self._sxy / (self._syy + 1e-9)
                self._ola += self._window * np.fft.irfft(x - h * y, self.N).astype(np.float32)
            self._emit(self._ola[: self.HOP] / 1.5)  # Hann at a quarter hop sums to 1.5
            self._ola = np.concatenate([self._ola[self.HOP :], np.zeros(self.HOP, np.float32)])
            self._mic, self._ref = self._mic[self.HOP :], self._ref[self.HOP :]

    def _emit(self, samples: np.ndarray) -> None:
        if self.done >= 0:
            where = (self.done + np.arange(len(samples))) % len(self._out)
            self._out[where] = samples
        self.done += len(samples)

    def cleaned(self, start: int, n: int) -> np.ndarray | None:
        """Input samples ``start`` to ``start + n`` as cleaned, as far as that is done (the last
        N - HOP samples in are not yet), or None where they are not (or no longer) held."""
        n = min(n, self.done - start)
        if start < 0 or n <= 0 or self.done - start > len(self._out):
            return None
        return self._out[(start + np.arange(n)) % len(self._out)].copy()


class FrameCanceller:
    """A backend fed float32 16 kHz chunks of any length: returns as many cleaned samples as it
    takes in, one frame (10 ms) behind until the first frame is full."""

    def __init__(self, process: Backend) -> None:
        self.process = process
        self._near = np.zeros(0, np.float32)
        self._far = np.zeros(0, np.float32)
        self._out = np.zeros(FRAME, np.float32)  # the frame of latency, silent at the start

    def __call__(self, near: np.ndarray, far: np.ndarray, bypass: bool = False) -> np.ndarray:
        """``bypass``: the speaker has long been silent: the frames go through as they are
        (the canceller is not run), one frame behind as always."""
        self._near = np.concatenate([self._near, near])
        self._far = np.concatenate([self._far, far])
        n = len(self._near) // FRAME
        cleaned = [self._out]
        if bypass:
            cleaned.append(self._near[: n * FRAME])
        for i in range(0 if bypass else n):
            s = slice(i * FRAME, (i + 1) * FRAME)
            cleaned.append(self.process(_to_int16(self._near[s]), _to_int16(self._far[s])).astype(np.float32) / 32768.0)
        self._near, self._far = self._near[n * FRAME :], self._far[n * FRAME :]
        out = np.concatenate(cleaned)
        take = len(near)
        self._out = out[take:]
        return out[:take]


class Recording:
    """What a canceller was given and gave back, chunk by chunk, in ``folder``: ``mic.f32``,
    ``far.f32`` (the reference as cut for each chunk) and ``out.f32`` (float32, 16 kHz), and
    ``chunks.jsonl`` (each chunk's samples and capture time). ``bench/echo_replay.py`` replays
    it through the VAD and ``near_end`` with other settings: the same signals, side by side."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self._files = {k: open(folder / f"{k}.f32", "wb") for k in ("mic", "far", "out")}  # noqa: SIM115
        self._chunks = open(folder / "chunks.jsonl", "w")  # noqa: SIM115

    def write(self, mic: np.ndarray, far: np.ndarray, out: np.ndarray, captured_at: float) -> None:
        for key, x in (("mic", mic), ("far", far), ("out", out)):
            self._files[key].write(np.asarray(x, np.float32).tobytes())
            self._files[key].flush()  # a session ends by a signal as often as not
        self._chunks.write(json.dumps({"n": len(mic), "captured_at": captured_at}) + "\n")
        self._chunks.flush()


class EchoCanceller:
    """Removes the speaker's sound (``far``) from microphone chunks.

    ``__call__(chunk, captured_at)``: ``chunk`` is 16 kHz microphone audio, ``captured_at`` the
    monotonic time of its first sample. The reference for that span is cut from ``far``
    (resampled to 16 kHz once, as it arrives), so the canceller only has the acoustic path
    left to find. ``seconds``: the microphone audio processed so far (the canceller's clock).
    ``record``: a folder to keep what it was given and gave back in (:class:`Recording`).
    """

    def __init__(self, far: FarEnd, name: str = "pywebrtc", record: Path | None = None) -> None:
        self.name = name
        self.far = far
        self._cancel = FrameCanceller(backend(name))
        self.recording = Recording(record) if record is not None else None  # once the backend is there
        self._ref = np.zeros(0, np.float32)  # the reference at 16 kHz ...
        self._ref_t = 0.0  # ... and the DAC time of its first sample
        self._resampler = self._new_resampler()
        self._next_dac: float | None = None  # where the next far block should start
        self.seconds = 0.0
        self.gaps = 0  # times the speaker's stream jumped (an underrun, a restart)
        self._pos: float | None = None  # DAC time of the next reference sample to hand out
        self.path = EchoPath()
        self.linear_echo = LinearEcho()
        self._linear_from: int | None = None  # sample (the VAD's count) from which LinearEcho knew the lag
        self.shift = LEAD_S  # the reference is cut this much later than the microphone's time
        self.moves = 0  # times the reference was moved to where the echo was found
        self.slips = 0  # times the microphone's clock had drifted too far from the speaker's
        self._far_s = 0.0  # seconds of speaker sound heard so far ...
        self._mic_e = self._out_e = 0.0  # ... and the energy in and out over them (decaying)
        self.converged = False  # it has earned trust: see TRUST_DB
        self.talk = TalkOver(self.path)  # is a person talking over moi: fed each chunk

    def _pull(self) -> None:
        """Add the blocks the player wrote since the last call to the 16 kHz reference, one after
        the other, sample for sample. Only where a block's DAC time is more than GAP_S away
        from that count did the stream jump: when it underran (the speaker played silence
        meanwhile), the gap is filled with silence, and a block stamped earlier than the end of
        what is held replaces the overlap, so the reference stays what the speaker played when."""
        parts = []  # joined once at the end: the reference is up to REACH_S long, a block 20 ms
        for dac, block in self.far.take():
            x = self._resample(block)
            if self._next_dac is None:  # the first block
                self._ref, self._ref_t = x, dac
                self._next_dac = dac + len(block) / self.far.rate
                continue
            gap = dac - self._next_dac
            if abs(gap) > GAP_S:
                self.gaps += 1
                self._ref, parts = np.concatenate([self._ref, *parts]), []
                if gap > 0:
                    self._ref = np.concatenate([self._ref, np.zeros(int(round(gap * SPEECH_RATE)), np.float32)])
                elif (drop := int(round(-gap * SPEECH_RATE))) < len(self._ref):
                    self._ref = self._ref[: len(self._ref) - drop]
                else:  # stamped before anything held (a stream restarted after underruns): start there
                    self._ref, self._ref_t = np.zeros(0, np.float32), dac
                self._next_dac = dac
            self._next_dac += len(block) / self.far.rate
            parts.append(x)
        if parts:
            self._ref = np.concatenate([self._ref, *parts])

    def _new_resampler(self):  # noqa: ANN202 - a soxr.ResampleStream, or None at 16 kHz
        if self.far.rate == SPEECH_RATE:
            return None
        import soxr

        return soxr.ResampleStream(self.far.rate, SPEECH_RATE, 1, dtype="float32")

    def _resample(self, block: np.ndarray) -> np.ndarray:
        return block if self._resampler is None else self._resampler.resample_chunk(block)

    def reference(self, start: float, n: int) -> np.ndarray:
        """The next ``n`` samples of the 16 kHz reference, for microphone audio captured from
        monotonic time ``start`` on (zeros where the speaker played nothing we know of).

        The reference runs on in step with the microphone, sample for sample, whatever the
        jitter of the two clocks: a canceller's filter is a fixed delay line and cannot follow
        a reference that shifts by a few samples each block. Only when the clocks drift apart
        by more than ``SLIP_S`` is it cut afresh at ``start``.
        """
        self._pull()
        if self._pos is None or abs(start - self._pos) > SLIP_S:
            self.slips += self._pos is not None
            self._pos = start
        i = int(round((self._pos - self._ref_t) * SPEECH_RATE))
        self._pos += n / SPEECH_RATE
        out = np.zeros(n, np.float32)
        lo, hi = max(i, 0), min(i + n, len(self._ref))
        if hi > lo:
            out[lo - i : hi - i] = self._ref[lo:hi]
        # what is used is kept for REACH_S, where a move of the reference may look for it again
        drop = min(max(i + n - int(EchoPath.REACH_S * SPEECH_RATE), 0), len(self._ref))
        self._ref, self._ref_t = self._ref[drop:], self._ref_t + drop / SPEECH_RATE
        return out

    def __call__(self, chunk: Audio, captured_at: float) -> Audio:
        far = self.reference(captured_at + self.shift, len(chunk.samples))
        # silence costs little: with the speaker quiet for IDLE_S there is no echo left to take out
        idle = self.talk.quiet_s >= IDLE_S and not far.any()
        cleaned = self._cancel(chunk.samples, far, bypass=idle)
        if self.recording is not None:
            self.recording.write(chunk.samples, far, cleaned, captured_at)
        self.seconds += chunk.seconds
        mic_e, out_e = float(np.sum(np.square(chunk.samples))), float(np.sum(np.square(cleaned)))
        active = len(far) > 0 and float(np.mean(np.square(far))) >= FAR_ACTIVE
        self._learn(far, mic_e, out_e, active)
        lag = self.path.lag  # unknown for the first 4 s of moi's voice, and again after a move
        if lag is None:
            self._linear_from = None
        elif self._linear_from is None:  # trusted once it has had LEARN_S to learn at a known lag
            self._linear_from = int(round((self.seconds + LinearEcho.LEARN_S) * SPEECH_RATE))
        alone = active and not _let_through(mic_e, out_e)  # the canceller found only moi's echo
        self.linear_echo.feed(chunk.samples, far, lag if lag is not None else TRAIL_S, learn=alone)
        lag = self.path.update(chunk.samples, far, active)
        if lag is not None and not REACH[0] <= lag <= REACH[1]:  # move the reference: the next cut is afresh
            self.shift -= lag - TRAIL_S
            self.moves += 1
            self.path.reset()
            self.converged = False  # the canceller's filter was for the old place: earn trust again
            self._far_s = self._mic_e = self._out_e = 0.0
        self.talk.observe(self.seconds, len(chunk.samples), mic_e, out_e, active)
        return Audio(cleaned, SPEECH_RATE)

    def linear(self, start_s: float, n: int) -> np.ndarray | None:
        """``n`` samples of the microphone from ``start_s`` (its own stream time, as the VAD
        counts it) with moi's voice taken out by a linear filter only (LinearEcho): what an
        utterance should sound like to Whisper. Fewer where the last are not done yet; None
        where none is held, or before the filter has known the echo's lag for LEARN_S."""
        start = int(round(start_s * SPEECH_RATE))
        if self._linear_from is None or start < self._linear_from:
            return None  # the canceller's own output, then: better than the microphone as it was
        return self.linear_echo.cleaned(start, n)

    @property
    def erle_db(self) -> float:
        """Echo return loss enhancement: how much quieter the microphone is after cancelling,
        over the recent audio while the speaker played (0 before it has played anything)."""
        return 10.0 * float(np.log10((self._mic_e + 1e-12) / (self._out_e + 1e-12))) if self._far_s else 0.0

    @property
    def playing(self) -> bool:
        """Whether moi's voice is in the microphone (its echo's tail included): see TalkOver."""
        return self.talk.playing

    def played(self, start_s: float, end_s: float) -> bool:
        return self.talk.played(start_s, end_s)

    def _learn(self, far: np.ndarray, mic_e: float, out_e: float, active: bool) -> None:
        """The ERLE over the recent audio while the speaker played, and trust (TRUST_DB)."""
        if not active:
            return
        decay = 0.97  # about a second of memory at 32 ms chunks
        self._far_s += len(far) / SPEECH_RATE
        self._mic_e = decay * self._mic_e + mic_e
        self._out_e = decay * self._out_e + out_e
        if not self.converged and self._far_s >= TRUST_S and self.erle_db >= TRUST_DB:
            self.converged = True


class TalkOver:
    """Is a person talking over moi? Judged chunk by chunk from what the canceller took in and
    gave back (``observe``) and from how much of the microphone's sound the echo's linear
    path cannot explain (:meth:`EchoPath.unexplained`). The conversation asks ``person()``
    (stop or pause the reply for them) and ``someone()`` (pause it before the VAD can tell).
    ``playing``/``played``: moi's voice in the microphone, now and over a span."""

    def __init__(self, path: EchoPath) -> None:
        self.path = path
        self.seconds = 0.0  # microphone audio observed (the canceller's clock)
        self._recent: deque[tuple[int, float, float]] = deque()  # (samples, mic energy, out energy)
        self._recent_n = 0
        self._far_last = -1e9  # when the speaker was last heard playing ...
        self._far_since = -1e9  # ... and since when it has played without a pause
        self._share: tuple[float, float] | None = None  # (seconds, unexplained over NEAR_S) at the last chunk asked
        self._sure = 0  # chunks in a row in which someone() held
        self._levels: deque[float] = deque(maxlen=int(FLOOR_S * SPEECH_RATE / 512))  # the microphone's chunk powers
        # where each chunk in which it played ended (s), as far back as LinearEcho keeps (chunks
        # of 512 samples and more, so half that size bounds how many)
        self._played: deque[float] = deque(maxlen=int(LinearEcho.KEEP_S * SPEECH_RATE / 256))

    def observe(self, seconds: float, n: int, mic_e: float, out_e: float, active: bool) -> None:
        """A chunk of ``n`` samples ending at ``seconds``: its energy in and out of the
        canceller, and whether the speaker played in it."""
        self.seconds = seconds
        self._recent.append((n, mic_e, out_e))
        self._recent_n += n
        if active:
            if seconds - self._far_last > PAUSE_S:
                self._far_since = seconds
            self._far_last = seconds
            self._played.append(seconds)
        while self._recent_n - self._recent[0][0] >= NEAR_S * SPEECH_RATE:
            self._recent_n -= self._recent.popleft()[0]
        power = mic_e / max(n, 1)
        self._levels.append(power)
        loud = power >= min(self._levels) * 10 ** (SURE_DB / 10) and power > QUIET
        # moi's voice has played for NEAR_S and REACH since it began after a pause of PAUSE_S,
        # and it is not in such a pause now (its pauses at commas, up to 0.3 s, do not count)
        settled = seconds - self._far_since >= NEAR_S + REACH[1] and seconds - self._far_last < PAUSE_S
        self._sure = self._sure + 1 if settled and loud and self._unexplained() >= SURE_SHARE else 0

    def _unexplained(self) -> float:
        """EchoPath.unexplained over NEAR_S, once a chunk."""
        if self._share is None or self._share[0] != self.seconds:
            self._share = (self.seconds, self.path.unexplained(NEAR_S))
        return self._share[1]

    @property
    def playing(self) -> bool:
        """Whether moi's voice is in the microphone: the speaker played within the last TAIL_S
        (its echo's tail)."""
        return self.seconds - self._far_last < TAIL_S

    @property
    def quiet_s(self) -> float:
        """Seconds since the speaker last played."""
        return self.seconds - self._far_last

    def played(self, start_s: float, end_s: float) -> bool:
        """Whether moi's voice played in the microphone's span ``start_s`` to ``end_s`` (the
        VAD's count), as far back as LinearEcho keeps."""
        return any(start_s < t <= end_s + 0.032 for t in reversed(self._played))

    def person(self) -> bool:
        """Whether a person is in what the microphone heard over the last NEAR_S, beside moi's
        own echo: the canceller let the microphone through (NEAR_DB) for PERSON_S of it, and
        PERSON_SHARE of that sound is not moi's (no linear filter of the reference explains
        it), GUARDED_SHARE at the onset of moi's voice and in the TAIL_S after it stops
        (ONSET_S, TAIL_S). A person, not silence: an utterance moi's echo began is held and
        judged again as it goes on (cloud.conversation), and the pause between two pieces of a
        reply must not release it."""
        tail = self.seconds > self._far_last  # it played, but not in the last chunk
        guarded = self.playing and (tail or self.seconds - self._far_since < ONSET_S)
        through = sum(n for n, m, o in self._recent if m > QUIET * n and _let_through(m, o))
        share = GUARDED_SHARE if guarded else PERSON_SHARE
        return through >= PERSON_S * SPEECH_RATE and self._unexplained() >= share

    def someone(self) -> bool:
        """Whether something that is not moi's voice, most likely a person, came into the
        microphone while moi plays: SURE_SHARE of its sound unexplained, two chunks in a row,
        and SURE_DB louder than the room (see SURE_SHARE). Sooner than ``person`` where AEC3
        holds a person down, but no VAD has asked whether it is speech."""
        return self._sure >= 2


def check(spec: str) -> str:
    """``spec`` (``MOI_ECHO_CANCELLER``) if it names a canceller, ``auto`` or ``off``; else a
    ConfigError, before anything is loaded (a typo must not quietly mean "no canceller")."""
    if spec not in ("auto", "off", *BACKENDS):
        raise ConfigError(f"unknown echo canceller {spec!r} (MOI_ECHO_CANCELLER): choose one of {', '.join(BACKENDS)}, auto or off")
    return spec


def canceller(far: FarEnd, spec: str = "auto", record: Path | None = None) -> EchoCanceller | None:
    """The echo canceller ``spec`` names for a player's ``far`` end: ``auto`` takes the first of
    BACKENDS that is installed (None when none is), ``off`` is None, a name must be installed.
    ``record``: see :class:`Recording`."""
    if check(spec) == "off":
        return None
    if spec != "auto":
        try:
            return EchoCanceller(far, spec, record)
        except ImportError as exc:
            raise ConfigError(f"echo canceller {spec!r} is not installed ({exc}): {INSTALL[spec]}") from exc
    for name in BACKENDS:
        try:
            return EchoCanceller(far, name, record)
        except ImportError:
            continue
    return None
