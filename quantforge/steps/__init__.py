"""Step families every model shares: the source, evaluation windows and reference, calibration (and the
importance matrix), quality gates, and the GPTQModel checkpoint steps GPTQ and AWQ have in common. They
import the core and the leaves, never a format or a publisher."""
