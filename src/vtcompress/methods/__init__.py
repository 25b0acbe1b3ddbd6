"""Built-in methods, one file per family. Importing this package registers them all."""

from . import attention, query, similarity, transform  # noqa: F401,E402
