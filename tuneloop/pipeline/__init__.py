"""Stage I/O: params read and validated once, what each stage reads, writes and logs; ranks and workers."""
