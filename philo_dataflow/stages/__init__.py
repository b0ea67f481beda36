"""The stage modules: every public function in them is a node of the dataflow. In the order data flows:
``loading``, ``splitting``, ``tokenization``, ``modeling``, ``training``, ``prediction``, ``metrics``,
``judging``, ``plots``, ``report``, ``exporting``, ``tracking``, ``saving`` (``philo_dataflow.MODULES``)."""
