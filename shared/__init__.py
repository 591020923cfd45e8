"""Types and protocol both sides of moi speak: audio, events, messages, config, models."""
