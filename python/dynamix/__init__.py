"""dynamix Python SDK: write Dynamo-style workers and clients against dynamix.

``dynamix.runtime`` and ``dynamix.llm`` have the layout of Dynamo's ``dynamo.runtime`` and
``dynamo.llm``; ``python -m dynamix.compat script.py`` runs an unmodified ``import dynamo...`` script.
"""

__version__ = "0.1.0"
