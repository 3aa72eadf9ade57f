"""The graph-colouring workload: DIMACS I/O, generators, initial colourings, phases."""
