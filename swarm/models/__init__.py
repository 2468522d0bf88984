"""Model families, presets, partial checkpoint loading and the block/head modules built from them."""
