"""Data-plane helpers on hivemind: tensor streams, DHT announcements, an event-loop thread."""
