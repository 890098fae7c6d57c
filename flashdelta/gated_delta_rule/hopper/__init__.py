"""TileLang kernels for Hopper (SM90a): the chunked forward."""
