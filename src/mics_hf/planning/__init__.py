"""Planning tools behind `mics-hf plan`: model presets, FLOP counting and the alpha-beta cost model.

Not imported by `import mics_hf`; presets need transformers.
"""
