"""The core: config, errors, run layout, io and tars, catalog, weights, devices, buckets, the run lock. Imports only itself."""
