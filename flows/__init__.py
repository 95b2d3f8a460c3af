"""Prefect flows: which stages run, in what order, with what parameters. No ML or data logic here."""

import logging as _logging

# The plain layers log through the standard library; Prefect forwards these loggers to the run logs
# (PREFECT_LOGGING_EXTRA_LOGGERS) but leaves their level unset, which would drop INFO messages.
for _name in ("gptflow", "data", "model", "eval"):
    if _logging.getLogger(_name).level == _logging.NOTSET:
        _logging.getLogger(_name).setLevel(_logging.INFO)
