"""Where work goes: per-task Redis Streams, the reply path, and the message schema."""
