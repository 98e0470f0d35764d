"""Device state beyond memory: snapshot codec, local SQLite store, changelog topic, restore."""
