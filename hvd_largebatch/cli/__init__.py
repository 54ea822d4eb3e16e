"""The ``hvd-largebatch`` command line (``main``), one module per command: ``train``, ``plan``,
``launch``, ``info``, ``prepare_data``, ``demo``. Each parses its arguments and calls the
training layer (or the schedules, for ``plan``)."""
