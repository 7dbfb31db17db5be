"""The command line's private parts: output formatting and the capture history.

>>> from arraysnap._cli.output import size_text
>>> size_text(10)
'10 B'
"""
