"""The one error type converters raise: always names the file, the key and what was expected."""


class ConversionError(ValueError):
  pass
