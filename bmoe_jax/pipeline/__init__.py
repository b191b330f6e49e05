"""The pipeline above the numerics: options (``configs``), flags (``flags``), data loading (``data``), one
registry of uncertainty methods (``methods``) and the stages (``stages``) that the CLI, ``bmoe demo`` and the
experiments share."""
