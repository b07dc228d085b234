"""The kernel layer: one public function per operation whose fast implementation depends on the
platform or on hand-written derivatives, beside a plain reference implementation that the tests hold
each fast path to (values and gradients). bigjax.nn's modules call these and read like the papers.

  recurrent   masked_scan (reference, any cell), lstm_scan (the LSTM with its backward written out)
"""
