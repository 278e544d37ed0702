"""The package version, in a module of its own: anything may import it without importing the
package's public front (``repair/__init__.py``), so no import arrow runs up the layers."""
__version__ = "0.1.0"
