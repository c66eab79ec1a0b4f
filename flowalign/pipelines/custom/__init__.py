"""diffusers custom-pipeline folders, one per family: ``custom_pipeline=flowalign.pipelines.custom_pipeline_path(f)``.

Each folder holds the ``pipeline.py`` that diffusers loads from a local ``custom_pipeline`` directory. These
``__init__.py`` files only make setuptools ship the folders with the package; diffusers ignores them.
"""
