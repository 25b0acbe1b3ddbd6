"""Built-in methods, one file per family. Importing this package registers them all."""
