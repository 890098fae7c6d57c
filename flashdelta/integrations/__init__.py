"""Ways into flashdelta from the frameworks users already run: ``transformers``. Each integration
imports its framework only when called, so none is a dependency of flashdelta."""
