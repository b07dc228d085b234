"""The kernel layer: one public function per operation whose fast implementation depends on the
platform or on hand-written derivatives, beside a plain reference implementation that the tests hold
each fast path to (values and gradients). bigjax.nn's modules call these and read like the papers.

  attention    attention (cuDNN's fused kernel or XLA's matmuls with the softmax backward written
               out), grouped_attention (the heads-first layout the KV cache holds), reference
  convolution  convolution (XLA's, or slices and one matmul on CPU where that is faster), reference
  recurrent    masked_scan (the reference, any cell), lstm_scan (the LSTM, its backward written out)
"""
