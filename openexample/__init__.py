"""OpenExample: the protocol library shared by DeSVig agents and controllers.

Pure code, no sockets: generated messages (``openexample.v1``), the tensor codec,
message builders, the vigilance rule table and the RT/FT label tables.
"""

__version__ = "0.1.0"
