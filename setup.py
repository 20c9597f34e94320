"""Only the optional compiled part; everything else is in setup.cfg.

openexample/_nearkernel.c is the near-copy lookup in one call (issue 18's fast-path
budget). ``optional=True``: without a C compiler the install goes on and
openexample/perceptual.py uses its numpy path.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "openexample._nearkernel",
            ["openexample/_nearkernel.c"],
            extra_compile_args=["-O3"],
            optional=True,
        )
    ]
)
