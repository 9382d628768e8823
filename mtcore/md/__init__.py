"""Molecular dynamics with mtcore models: the geometry conventions shared by the ASE calculator
(:mod:`mtcore.calculator`) and the LAMMPS coupling (:mod:`mtcore.md.lammps`), and the
``mtcore md`` commands. Nothing here imports ASE or LAMMPS until it is used."""
