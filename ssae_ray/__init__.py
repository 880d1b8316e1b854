"""ssae-ray: Specialized Sparse Autoencoders on Ray."""

__version__ = "0.1.0"
