from dnsproxy.cli import main

raise SystemExit(main())
