"""The bundled configs: this folder ships inside the package as ``charlm.configs``.

``charlm train -c NAME`` and ``charlm.load_config(NAME)`` find them by name through
``importlib.resources``, so they work from any directory after any kind of install.
"""
