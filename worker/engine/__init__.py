"""diffmine's method as a small library over tensors: no web, no database.

Read in this order: denoiser (the interface), pixel / stable_diffusion (backends), training,
typicality; mining and translation modules build on them.
"""
