"""The artifact contract: the manifest (`manifest`), a loaded artifact folder (`artifact`), the model
presets (`presets` + `presets.json`) and where artifacts and engine caches live (`cache`)."""
