from memopt.cli import main

raise SystemExit(main())
