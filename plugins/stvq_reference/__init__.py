"""The reference Styled VQ as stvq's default plugins, registered through the ``stvq`` entry-point group
exactly as a third-party plugin package is (see :mod:`stvq_reference.plugin`)."""
