// Prettier settings: the project's one formatter, for src/, test/ and the config files.
export default {
  singleQuote: true,
  printWidth: 100,
  trailingComma: 'all',
};
