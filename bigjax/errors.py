"""The one exception type that means "the user asked for something that cannot work"."""


class UserError(ValueError):
  """A mistake in flags, data or input; the message says what is wrong and how to fix it.

  Experiments print it as a single line and exit non-zero instead of showing a traceback.
  """
