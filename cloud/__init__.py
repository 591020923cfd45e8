"""The model side, run in-process on the laptop, on ``moi serve`` or on Modal: the runners
(Whisper, SmolLM2, Kokoro), the turn, the listening stage (VAD, Smart Turn, meters), the
conversation state machine and its live session, and the gateway that serves all of it over
HTTP and the Realtime WebSocket. Knows nothing of Modal, devices or views (no ``local/``)."""
