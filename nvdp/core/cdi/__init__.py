"""CDI (Container Device Interface) specs as plain data: the model, its JSON, versions, names, root transforms
(`spec`), and what nvdp puts in them from the driver files found on the node (`build`). No I/O: `nvdp.cdi` finds
the files and writes the specs."""
