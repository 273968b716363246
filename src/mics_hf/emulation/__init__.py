"""The emulated cluster behind `mics-hf emulate` (root only): network namespaces with shaped links (cluster),
the scaling rule (scale), one rank's emulated step (step) and the weak-scaling sweep (sweep).

Loaded lazily by the CLI; never by `import mics_hf`.
"""
