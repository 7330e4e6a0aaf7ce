"""The tools layer, beside the front door: the ``sparsec`` command line, benchmarks
(``sparsec bench ...``), the dump inspector, plan bisection and the HTML report. Tools may
import every layer below; nothing in sparsec imports them but the front door."""
