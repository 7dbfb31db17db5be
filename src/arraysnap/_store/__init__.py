"""The store's private parts, each owning one job and its state; ``arraysnap.store`` wires them.

Nothing here imports the facade (``arraysnap.store``): the parts know each other only
through what the facade hands them.

>>> from arraysnap._store.catalog import Catalog
>>> Catalog.__name__
'Catalog'
"""
